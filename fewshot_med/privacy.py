"""What may leave the machine: data paths become salted hashes before they reach the tracking store.

Hospital paths and file names often carry patient or staff names. Unless ``tracking.log_paths`` is
true, every path the toolkit would log is replaced by ``path-<12 hex>``: a SHA-256 HMAC of the path's
absolute form keyed by a salt that never leaves this machine (``$FEWSHOT_MED_SALT``, else a random salt
created once in ``~/.config/fewshot-med/salt``), so the same file gets the same token on this machine
and nobody holding only the store can test guesses of names against it.

A ``Redaction`` applies this to one run: config values that are paths (``data.source`` unless it names
the catalogue, the demo or MedMNIST; any value that looks like a path), and every occurrence of the
run's known paths in free text (error messages, descriptions, artifacts). See ``docs/privacy.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

#: Environment variable holding the salt; overrides the salt file.
SALT_VARIABLE = "FEWSHOT_MED_SALT"
#: Prefix of a redacted path.
TOKEN_PREFIX = "path-"
#: The config key whose value is a dataset spec: a path unless it names a dataset (``is_dataset_path``).
DATA_SOURCE_KEY = ("data", "source")
#: URI schemes that locate a file on this machine (``sqlite:///…``, ``file:///…``).
LOCAL_SCHEMES = ("file", "sqlite")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: ``C:\`` is a drive
#: After a known path, the rest of the path: up to a quote, backtick, line end, or ``: `` ``; `` ``, ``.
_PATH_TAIL = r"(?:(?![:;,]\s)[^\n'\"`])*"


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
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # created meanwhile by a concurrent run
            return path.read_text().strip().encode()
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def _canonical(text: str) -> str:
    """A local path as its absolute, resolved form (``data/x.csv`` from ``/home/u`` and
    ``/home/u/data/x.csv`` are one file); URIs and other text as given."""
    if _SCHEME.match(text):
        return text
    try:
        return str(Path(text).expanduser().resolve())
    except (OSError, RuntimeError, ValueError):
        return text


def redact_path(path: str | os.PathLike[str], log_paths: bool = False) -> str:
    """``path`` as given when ``log_paths``, else ``path-<12 hex>``: the salted SHA-256 of its absolute
    form, the same token for every spelling of one file on this machine."""
    text = os.fspath(path)
    if log_paths:
        return text
    return TOKEN_PREFIX + hmac.new(_salt(), _canonical(text).encode(), hashlib.sha256).hexdigest()[:12]


def is_dataset_path(spec: str) -> bool:
    """Whether a ``data.source`` spec locates files (a ``.npz``, a CSV manifest, an image folder): every
    spec but the catalogue's names, ``demo`` and ``medmnist:<flag>[@size]``, which stay readable."""
    from fewshot_med.data.catalog import CATALOG

    return not (spec == "demo" or spec in CATALOG or spec.startswith("medmnist:"))


def looks_like_path(text: str) -> bool:
    """Whether ``text`` may hold folder or file names of this machine: a path with a separator, a
    home-relative path, or a ``file:``/``sqlite:`` URI. Web addresses and specs such as
    ``package:<name>``, ``medmnist:<flag>`` or ``generated:demo?…`` are not paths."""
    scheme = _SCHEME.match(text)
    if scheme:
        return scheme.group(1).lower() in LOCAL_SCHEMES
    return text.startswith("~") or "/" in text or "\\" in text


def is_absolute_path(text: str) -> bool:
    """Whether ``text`` is an absolute (or home-relative) path or a ``file:``/``sqlite:`` URI."""
    scheme = _SCHEME.match(text)
    if scheme:
        return scheme.group(1).lower() in LOCAL_SCHEMES
    return text.startswith("~") or os.path.isabs(text) or bool(re.match(r"^[A-Za-z]:[\\/]", text))


def _path_part(text: str) -> str:
    """The path inside a local URI (``sqlite:////x/db`` -> ``/x/db``); other text as given."""
    scheme = _SCHEME.match(text)
    return "/" + text[scheme.end() :].lstrip("/") if scheme else text


def _spellings(path: str) -> set[str]:
    """The ways a message may spell ``path``: as given, absolute and resolved; for a file (a name
    with a suffix), also its folder, under which a manifest's images usually lie. Spellings without a
    separator, and filesystem roots, are left out, so that no bare word of prose ever matches."""
    given = _path_part(path)
    absolute = os.path.abspath(os.path.expanduser(given))
    found = {path, given, os.path.expanduser(given), absolute, _canonical(given)}
    for spelling in (absolute, _canonical(given)):
        if Path(spelling).suffix:
            found.add(str(Path(spelling).parent))
    return {s for s in found if ("/" in s or "\\" in s) and s != Path(s).anchor and len(s) > 2}


@dataclass(frozen=True)
class Redaction:
    """How one run's values reach the tracking store.

    Attributes:
        log_paths: keep paths as they are (``tracking.log_paths``); every method then returns its input.
        known_paths: the run's paths (data source, config paths): wherever one of them, in any of its
            spellings, appears in free text, it and the rest of the path it starts become a token.
        data_source: the run's ``data.source`` spec, when the run has a config.
    """

    log_paths: bool = False
    known_paths: tuple[str, ...] = ()
    data_source: str | None = None

    @classmethod
    def for_config(cls, tree: Mapping[str, Any], log_paths: bool = False) -> Redaction:
        """The redaction of a run of the config ``tree`` (``config.model_dump(mode="json")``, or a section
        of it): its known paths are the config's path values."""
        data = tree.get(DATA_SOURCE_KEY[0])
        source = data.get(DATA_SOURCE_KEY[1]) if isinstance(data, Mapping) else None
        return cls(log_paths, tuple(dict.fromkeys(_path_values(tree))), source)

    def path(self, path: str | os.PathLike[str]) -> str:
        """``redact_path(path, self.log_paths)``."""
        return redact_path(path, self.log_paths)

    def source(self, spec: str) -> str:
        """A ``data.source`` spec: its token when it is a path (``is_dataset_path``), else as given."""
        return self.path(spec) if is_dataset_path(spec) else spec

    def tree(self, tree: Any) -> Any:
        """A copy of a config tree (mappings, lists, scalars) whose path values are tokens: ``data.source``
        by ``source``, every other string that ``looks_like_path``."""
        if self.log_paths:
            return tree
        return _map_paths(tree, (), self.path)

    def text(self, text: str) -> str:
        """``text`` with every known path in it, and the rest of the path it starts (a file under a
        known folder), replaced by its token."""
        if self.log_paths or self._pattern is None:
            return text
        return self._pattern.sub(lambda match: redact_path(match.group(0)), text)

    @cached_property
    def _pattern(self) -> re.Pattern[str] | None:
        spellings = sorted({s for path in self.known_paths for s in _spellings(path)}, key=len, reverse=True)
        if not spellings:
            return None
        return re.compile(f"(?:{'|'.join(map(re.escape, spellings))}){_PATH_TAIL}")


def _is_path_value(keys: Sequence[str], value: str) -> bool:
    return is_dataset_path(value) if tuple(keys) == DATA_SOURCE_KEY else looks_like_path(value)


def _map_paths(tree: Any, keys: tuple[str, ...], replace: Callable[[str], Any]) -> Any:
    """``tree`` with ``replace(value)`` for every path value (see ``Redaction.tree``)."""
    if isinstance(tree, Mapping):
        return {key: _map_paths(value, (*keys, str(key)), replace) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_paths(value, keys, replace) for value in tree)
    if isinstance(tree, str) and _is_path_value(keys, tree):
        return replace(tree)
    return tree


def _path_values(tree: Any) -> list[str]:
    """Every path value of a config tree, in order."""
    found: list[str] = []
    _map_paths(tree, (), lambda value: found.append(value) or value)
    return found
