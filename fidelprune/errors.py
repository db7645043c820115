"""fidelprune's exception types. Every user error is a FidelpruneError, whose message is one line that names the
flag or file and says what to do; the CLI prints it as `error: ...`. Anything else is a bug."""

from __future__ import annotations

import math


class FidelpruneError(Exception):
    """A user error: bad settings, files or models. Subclasses also derive from the matching built-in type."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, as SIGINT raises KeyboardInterrupt: every `finally` and cleanup runs, and the
    CLI ends with one line (exit 143; 130 for SIGINT). `kept`, where set, says what the run left for a later one."""


class ConfigError(FidelpruneError, ValueError):
    """A setting out of its range or of the wrong type."""


def check_int(name: str, value, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{name} must be at least {low}, got {value}")


SEED_MAX = 2**63 - 1  # what torch.Generator.manual_seed and every seeded draw here take


def check_seed(name: str, value) -> None:
    """A seed: a whole number from 0 to SEED_MAX."""
    check_int(name, value, 0)
    if value > SEED_MAX:
        raise ConfigError(f"{name} must be at most {SEED_MAX} (a 64-bit seed), got {value}")


def check_float(name: str, value, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """A finite number in [low, high] (an open end where asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ConfigError(f"{name} must be in {left}{low if low is not None else '-inf'}, "
                          f"{high if high is not None else 'inf'}{right}, got {value}")
