"""User-facing errors: the CLI prints their message as one line, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Collection


class FewshotMedError(Exception):
    """An error the user can fix; its message names the file or key and says what to do."""


class DataError(FewshotMedError):
    """Unreadable, missing or inconsistent data."""


class ConfigError(FewshotMedError):
    """An invalid configuration file or override."""


def did_you_mean(value: object, choices: Collection[str]) -> str:
    """``"; did you mean 'x'?"`` for the choice closest to ``value`` (``difflib``), else ``""``."""
    close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
    return f"; did you mean '{close[0]}'?" if close else ""


def not_one_of(value: object, kind: str, choices: Collection[str]) -> str:
    """``"unknown <kind> 'protonett'; choose from …; did you mean 'protonet'?"``."""
    listing = ", ".join(sorted(choices)) or "none"
    return f"unknown {kind} {value!r}; choose from {listing}{did_you_mean(value, choices)}"
