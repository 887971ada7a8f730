"""Checkpoints: atomic ``torch.save`` files holding a backbone, its spec and training state, and the
lock that keeps two runs from writing the same checkpoint at once."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewshot_med.errors import FewshotMedError
from fewshot_med.models.backbone import BackboneSpec, create_backbone


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` atomically: an interrupted save leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@contextmanager
def checkpoint_lock(path: str | Path) -> Iterator[Path]:
    """Hold ``<path>.lock`` for the block, so that two runs of one config at once cannot overwrite each
    other's checkpoint at ``path`` (and ``--resume`` keeps finding the interrupted run's).

    The lock is the operating system's (``flock``, POSIX): it goes with the process that holds it, so a
    killed run leaves no stale lock. The lock file names its holder and stays in place. Yields ``path``.

    Raises:
        FewshotMedError: another process holds the lock.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_name(f"{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip() or "another process"
            raise FewshotMedError(
                f"{path}: checkpoint in use by {holder}; wait for that run to end, or give this one "
                "another folder (--set runtime.output_dir=...)"
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield path
    finally:
        os.close(descriptor)  # releases the lock


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (tensors land on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FewshotMedError(f"{path}: no such checkpoint; check the path or run the stage that writes it")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise FewshotMedError(f"{path}: unreadable checkpoint ({error}); delete it and rerun") from None


def backbone_state(backbone: nn.Module, spec: BackboneSpec) -> dict[str, Any]:
    """The part of a checkpoint that rebuilds a backbone: ``{"spec": …, "backbone": state_dict}``."""
    return {
        "spec": spec.to_dict(),
        "backbone": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
    }


def backbone_from_state(state: dict[str, Any]) -> tuple[nn.Module, BackboneSpec]:
    """Rebuild the backbone saved by ``backbone_state`` (or any checkpoint containing it)."""
    spec = BackboneSpec.from_dict(state["spec"])
    backbone = create_backbone(spec.name, in_chans=spec.in_chans, image_size=spec.image_size)
    backbone.load_state_dict(state["backbone"])
    return backbone, spec
