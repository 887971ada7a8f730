"""What the training loops share: checkpoint and exact resume, the best weights, early stopping.

A loop builds a ``Harness`` around its modules, optimizer state and random generators, calls
``restore`` when resuming, ``record`` after every validation and ``load_best`` at the end. Resuming
restores the weights, the optimizer (and scheduler, SWAG) state and every random generator, so an
interrupted run continues bit for bit on the CPU.

Under ``torchrun`` (``fewshot_med.training.distributed``) every rank keeps the same bookkeeping from
the same records; rank 0 alone writes the checkpoint, which holds every rank's random states
(``rng_by_rank``), and every rank restores from it its own (rank 0's when the group size changed).

Inside ``checkpoints_owned_by(run_id, on_resume)`` (the pipeline's stages: the MLflow run of the
stage) every checkpoint records the run that wrote it, and a loop that resumes one tells ``on_resume``
which run that was and how far it got, so the resumed run can be linked to the interrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel
from torch import Tensor, nn

from fewshot_med.data.roles import ClassSubset
from fewshot_med.errors import FewshotMedError
from fewshot_med.models import BackboneSpec, load_checkpoint, save_checkpoint
from fewshot_med.training import distributed

#: settings that do not change the training trajectory, so a resumed run may differ in them
RESUME_IRRELEVANT_SETTINGS = ("enabled",)


@dataclass(frozen=True)
class CheckpointOwner:
    """Who writes the checkpoints of the loops run in a ``checkpoints_owned_by`` block.

    Attributes:
        run_id: recorded in every checkpoint as ``written_by``; ``None`` records nothing.
        on_resume: called with the ``written_by`` of a checkpoint a loop resumes (when it has one) and
            the units that checkpoint had done.
    """

    run_id: str | None
    on_resume: Callable[[str, int], None] | None = None


_owner: ContextVar[CheckpointOwner | None] = ContextVar("fewshot_med_checkpoint_owner", default=None)


@contextmanager
def checkpoints_owned_by(
    run_id: str | None, on_resume: Callable[[str, int], None] | None = None
) -> Iterator[CheckpointOwner]:
    """Record ``run_id`` in the checkpoints the loops of this block write, and call ``on_resume`` with
    the recorded run and its units done when one of them resumes a checkpoint (see ``CheckpointOwner``)."""
    owner = CheckpointOwner(run_id, on_resume)
    token = _owner.set(owner)
    try:
        yield owner
    finally:
        _owner.reset(token)


class Stateful(Protocol):
    """What a checkpoint saves besides modules: an optimizer, a scheduler, a SWAG collector."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def run_identity(
    spec: BackboneSpec, train: ClassSubset, val: ClassSubset, settings: BaseModel, seed: int
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: spec, data, trajectory-relevant settings and seed."""
    recipe = {k: v for k, v in settings.model_dump().items() if k not in RESUME_IRRELEVANT_SETTINGS}
    return {
        "spec": spec.to_dict(),
        "data": {
            "dataset_digest": train.dataset_digest,
            "train_classes": list(train.class_names),
            "val_classes": list(val.class_names),
            "n_train": len(train),
            "n_val": len(val),
        },
        "settings": recipe,
        "seed": seed,
    }


def checkpoint_header(
    kind: str,
    version: int,
    spec: BackboneSpec,
    train: ClassSubset,
    val: ClassSubset,
    settings: BaseModel,
    seed: int,
) -> dict[str, Any]:
    """What heads every checkpoint of a loop: ``kind``, format ``version``, the run's identity (see
    ``run_identity``) and the backbone ``spec`` (so ``backbone_from_state`` can rebuild it)."""
    identity = run_identity(spec, train, val, settings, seed)
    return {"kind": kind, "version": version, "identity": identity, "spec": spec.to_dict()}


def cpu_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A CPU copy of a state dict that later training steps cannot change."""
    return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}


def check_resumable(state: dict[str, Any], header: dict[str, Any], path: Path, what: str) -> None:
    """Raise ``FewshotMedError`` naming the first difference between a checkpoint and this run.

    Args:
        state: the loaded checkpoint.
        header: this run's ``{"kind", "version", "identity": {"spec", "data", "settings", "seed"}}``.
        path: the checkpoint file, for the message.
        what: the loop's name in messages, e.g. ``pretraining``.
    """
    if not isinstance(state, dict) or state.get("kind") != header["kind"]:
        raise FewshotMedError(f"{path}: not a {what} checkpoint; delete it or choose another path")
    if state.get("version") != header["version"]:
        raise FewshotMedError(
            f"{path}: {what} checkpoint format {state.get('version')} is not {header['version']}; "
            "delete it and rerun"
        )
    identity, saved = header["identity"], state["identity"]
    for section in ("spec", "data", "settings"):
        for key in identity[section].keys() | saved[section].keys():
            mine, theirs = identity[section].get(key), saved[section].get(key)
            if mine != theirs:
                raise FewshotMedError(
                    f"{path}: checkpoint was written for {section} {key}={theirs!r}, this run has {mine!r}; "
                    f"delete the checkpoint or resume with the original {section}"
                )
    if saved["seed"] != identity["seed"]:
        raise FewshotMedError(
            f"{path}: checkpoint was written with seed {saved['seed']}, this run has seed "
            f"{identity['seed']}; delete the checkpoint or resume with the original seed"
        )


Generator = torch.Generator | np.random.Generator


def rng_states(generators: dict[str, Generator], device: torch.device) -> dict[str, Any]:
    """torch's global CPU (and CUDA) random states and those of the loop's own ``generators``."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    for name, generator in generators.items():
        is_torch = isinstance(generator, torch.Generator)
        states[name] = generator.get_state() if is_torch else generator.bit_generator.state
    return states


def set_rng_states(states: dict[str, Any], generators: dict[str, Generator], device: torch.device) -> None:
    """Inverse of ``rng_states``."""
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    for name, generator in generators.items():
        if isinstance(generator, torch.Generator):
            generator.set_state(states[name])
        else:
            generator.bit_generator.state = states[name]


@dataclass
class Harness:
    """Checkpoint, best-weights and early-stopping bookkeeping of one training loop.

    The loop counts ``unit`` s (epochs, episodes) and validates now and then; each validation's record
    goes to ``record``, which keeps the best weights, decides whether the run is over and writes the
    checkpoint. A checkpoint holds ``header``, the best weights under each module's name (so
    ``backbone_from_state`` reads the best backbone), the current weights under ``current``, each
    ``states`` entry under its name, the random states under ``rng``, the units done under ``unit``,
    ``history``, ``best_<unit>``, ``best_metric``, ``finished``, ``stopped_early`` and ``written_by`` (the
    run of the enclosing ``checkpoints_owned_by``, else ``None``).

    Attributes:
        what: the loop's name in messages, e.g. ``pretraining``.
        header: ``{"kind", "version", "identity", …}``: written into every checkpoint; kind, version and
            identity must match for a resume (``check_resumable``).
        path: where checkpoints go; ``None`` writes none.
        unit: what ``record`` counts: the key of a record's position, e.g. ``epoch``.
        total: units of the whole run.
        metric: the record key that selects the best weights (higher is better).
        modules: the trained modules by name, e.g. ``{"backbone": …, "head": …}``.
        states: optimizer, scheduler, … by name; ``None`` entries are saved as ``None``.
        generators: the loop's random generators by name (torch's global one is always saved).
        device: where training runs (for the CUDA random state).
        patience: stop after this many validations without improvement (``None``: never).
        keep_last: every validation replaces the best weights (and early stopping never stops).
        log_metrics: called after every checkpoint with the record less ``unit``, plus
            ``best_<metric>``, and the units done (the caller names the keys for its tracking store).
        history: the records so far.
        done: units done at the last record.
        best_step: units done at the best record (0: none yet).
        best_metric: its ``metric``.
        best_weights: copies of the modules' state dicts at the best record.
        finished: the run is over (all units done, or stopped early).
        stopped_early: early stopping ended it.
    """

    what: str
    header: dict[str, Any]
    path: Path | None
    unit: str
    total: int
    metric: str
    modules: dict[str, nn.Module]
    states: dict[str, Stateful | None]
    generators: dict[str, Generator]
    device: torch.device
    patience: int | None = None
    keep_last: bool = False
    log_metrics: Callable[[dict[str, float], int], None] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    done: int = 0
    best_step: int = 0
    best_metric: float = -math.inf
    best_weights: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    finished: bool = False
    stopped_early: bool = False

    def restore(self) -> bool:
        """Continue from the checkpoint at ``path``, if there is one; returns whether there was.

        Raises:
            FewshotMedError: no ``path``, or a checkpoint that does not belong to this run.
        """
        if self.path is None:
            raise FewshotMedError(f"{self.what}: resume=True needs a checkpoint_path to resume from")
        if not self.path.is_file():
            return False
        state = load_checkpoint(self.path)
        check_resumable(state, self.header, self.path, self.what)
        for name, module in self.modules.items():
            module.load_state_dict(state["current"][name])
        for name, stateful in self.states.items():
            if stateful is not None:
                stateful.load_state_dict(state[name])
        by_rank, rank = state.get("rng_by_rank") or [], distributed.world().rank
        same_world = len(by_rank) == distributed.world().size
        set_rng_states(by_rank[rank] if same_world else state["rng"], self.generators, self.device)
        self.history = state["history"]
        self.done, self.best_step = state[self.unit], state[f"best_{self.unit}"]
        self.best_metric = state["best_metric"]
        self.best_weights = {name: state[name] for name in self.modules}
        self.finished, self.stopped_early = state["finished"], state["stopped_early"]
        owner, written_by = _owner.get(), state.get("written_by")
        if owner is not None and owner.on_resume is not None and written_by is not None:
            owner.on_resume(written_by, self.done)
        return True

    def record(self, record: dict[str, float]) -> None:
        """Add a validation's ``record`` (``unit`` and ``metric`` among its keys), keep the weights if
        they are the best, decide whether to stop, write the checkpoint, then log the metrics."""
        self.history.append(record)
        self.done = int(record[self.unit])
        if self.keep_last or record[self.metric] > self.best_metric:
            self.best_step, self.best_metric = self.done, record[self.metric]
            self.best_weights = {name: cpu_copy(module.state_dict()) for name, module in self.modules.items()}
        stale = sum(past[self.unit] > self.best_step for past in self.history)  # validations since the best
        self.stopped_early = self.patience is not None and stale >= self.patience and self.done < self.total
        self.finished = self.stopped_early or self.done == self.total
        self.save()
        if self.log_metrics is not None:
            metrics = {key: value for key, value in record.items() if key != self.unit}
            metrics[f"best_{self.metric}"] = self.best_metric
            self.log_metrics(metrics, self.done)

    def save(self) -> None:
        """Write the checkpoint atomically (nothing without a ``path``); under ``torchrun`` every rank
        calls it (it gathers their random states) and rank 0 writes."""
        if self.path is None:
            return
        rng_by_rank = distributed.gather(rng_states(self.generators, self.device))
        if not distributed.is_main():
            return
        current = {name: cpu_copy(module.state_dict()) for name, module in self.modules.items()}
        states = {name: None if value is None else value.state_dict() for name, value in self.states.items()}
        owner = _owner.get()
        save_checkpoint(
            self.path,
            {
                **self.header,
                **self.best_weights,
                "current": current,
                **states,
                "rng": rng_by_rank[0],
                "rng_by_rank": rng_by_rank,
                self.unit: self.done,
                "history": self.history,
                f"best_{self.unit}": self.best_step,
                "best_metric": self.best_metric,
                "finished": self.finished,
                "stopped_early": self.stopped_early,
                "written_by": owner.run_id if owner is not None else None,
            },
        )

    def load_best(self) -> None:
        """Put the best weights into the modules and switch them to eval mode."""
        for name, module in self.modules.items():
            module.load_state_dict(self.best_weights[name])
            module.eval()
