"""`fidelprune prune|eval|report|recover|export`: one module per subcommand; each translates flags into the Python API's
config objects and calls it. Whatever the CLI can do, the Python API can do."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback

from ..errors import FidelpruneError, Terminated
from . import eval as eval_command
from . import export as export_command
from . import prune as prune_command
from . import recover as recover_command
from . import report as report_command
from .common import console

SUBCOMMANDS = (prune_command, eval_command, report_command, recover_command, export_command)
__all__ = ["build_parser", "console", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fidelprune", description="Prune, recover and evaluate causal LMs.")
    parser.add_argument("--verbose", "-v", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python delivers signals
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.run(args)
    except KeyboardInterrupt as stop:  # SIGINT, or SIGTERM as Terminated: temporary files are gone by now
        if args.verbose:
            raise
        kept = getattr(stop, "kept", None)
        print(f"error: interrupted by {'SIGTERM' if isinstance(stop, Terminated) else 'SIGINT'}; no output was written"
              + (f"; {kept}" if kept else ""), file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except (FidelpruneError, ValueError, OSError) as err:
        if args.verbose:
            raise
        message = " ".join(str(err).split())  # one line, unwrapped, so scripts can grep it
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - anything but a user error is a bug: show the traceback
        traceback.print_exc()
        print("error: this is a bug in fidelprune, not in your input: please report it with the command and the "
              "traceback above", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame) -> None:
    raise Terminated()
