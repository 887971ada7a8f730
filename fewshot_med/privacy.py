"""What may leave the machine: data paths become salted hashes before they reach the tracking store.

Hospital paths and file names often carry patient or staff names. Unless ``tracking.log_paths`` is
true, every path the toolkit would log is replaced by ``path-<12 hex>``: a SHA-256 of the path keyed
by a salt that never leaves this machine (``$FEWSHOT_MED_SALT``, else a random salt created once in
``~/.config/fewshot-med/salt``), so the same file gets the same token on this machine and nobody
holding only the store can test guesses of names against it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

#: Environment variable holding the salt; overrides the salt file.
SALT_VARIABLE = "FEWSHOT_MED_SALT"
#: Prefix of a redacted path.
TOKEN_PREFIX = "path-"


def salt_file() -> Path:
    """Where the machine's salt is kept (``$XDG_CONFIG_HOME/fewshot-med/salt`` or ``~/.config/…``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "fewshot-med" / "salt"


def _salt() -> bytes:
    """The salt: ``$FEWSHOT_MED_SALT``, else the salt file, created (mode 0600) on first use."""
    if os.environ.get(SALT_VARIABLE):
        return os.environ[SALT_VARIABLE].encode()
    path = salt_file()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def redact_path(path: str | os.PathLike[str], log_paths: bool = False) -> str:
    """``path`` as given when ``log_paths``, else ``path-<12 hex>`` (salted SHA-256 of the path text)."""
    text = os.fspath(path)
    if log_paths:
        return text
    return TOKEN_PREFIX + hmac.new(_salt(), text.encode(), hashlib.sha256).hexdigest()[:12]
