"""What every subcommand shares: the console, the flags declared once, and how a bad input becomes one line."""

from __future__ import annotations

import argparse

from rich.console import Console

console = Console(stderr=True)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """How a model is loaded: dtype, device, remote code."""
    parser.add_argument("--dtype", default="auto", help="float32 (CPU default), bfloat16 (GPU default), float16")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def add_device_map_flag(parser: argparse.ArgumentParser) -> None:
    """Model parallelism: where each module lives and runs (placement.py)."""
    parser.add_argument("--device-map", default=None, metavar="auto|balanced|sequential|FILE.json",
                        help="spread the decoder layers over several GPUs (and the CPU), each running where it lives: "
                             "accelerate's split, or a JSON file {module name: device}")


def add_output_flags(parser: argparse.ArgumentParser, default: str | None, what: str) -> None:
    """Where the output goes, and whether a non-empty one may be replaced."""
    parser.add_argument("--output", "-o", default=default, help=f"output directory ({what})")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def print_summary(title: str, summary: dict) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)
