"""Small file helpers shared across the package."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fewshot_med.errors import FewshotMedError


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers never see a half-written file.

    The text goes to a temporary file in the same folder, which then replaces ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def check_output_parent(path: Path, option: str, parents: bool = False) -> Path:
    """Make sure the folder ``path`` will be written into exists, before any work is done.

    Args:
        path: the file or folder a command will write.
        option: how the user named it (``--out``, ``OUT``), for the message.
        parents: create the missing parent folders (the command's ``--parents`` flag) instead of refusing.

    Returns:
        ``path``.

    Raises:
        FewshotMedError: the parent folder is missing (and ``parents`` is false) or is not a folder.
    """
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise FewshotMedError(f"{option} {path}: {parent} is a file, not a folder; pick another path")
    if not parent.exists():
        if not parents:
            raise FewshotMedError(
                f"{option} {path}: parent folder {parent} does not exist: create it first or pass --parents"
            )
        parent.mkdir(parents=True, exist_ok=True)
    return path
