"""What the training loops share to checkpoint and resume exactly: identities, copies, RNG states."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from fewshot_med.data.roles import ClassSubset
from fewshot_med.errors import FewshotMedError
from fewshot_med.models import BackboneSpec

#: settings that do not change the training trajectory, so a resumed run may differ in them
RESUME_IRRELEVANT_SETTINGS = ("enabled",)


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


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CPU copy of a state dict that later training steps cannot change."""
    return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}


def check_resumable(
    state: dict[str, Any], identity: dict[str, Any], path: Path, kind: str, version: int, what: str
) -> None:
    """Raise ``FewshotMedError`` naming the first difference between a checkpoint and this run.

    Args:
        state: the loaded checkpoint.
        identity: this run's ``{"spec", "data", "settings": {…}, "seed"}``.
        path: the checkpoint file, for the message.
        kind: the ``kind`` a checkpoint of this loop carries.
        version: the checkpoint format this code writes.
        what: the loop's name in messages, e.g. ``pretraining``.
    """
    if not isinstance(state, dict) or state.get("kind") != kind:
        raise FewshotMedError(f"{path}: not a {what} checkpoint; delete it or choose another path")
    if state.get("version") != version:
        raise FewshotMedError(
            f"{path}: {what} checkpoint format {state.get('version')} is not {version}; delete it and rerun"
        )
    saved = state["identity"]
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


def torch_rng_states(augment_generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """torch's global CPU (and CUDA) random states and the augmentation generator's."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "augment": augment_generator.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_torch_rng_states(
    states: dict[str, Any], augment_generator: torch.Generator, device: torch.device
) -> None:
    """Inverse of ``torch_rng_states``."""
    torch.set_rng_state(states["torch"])
    augment_generator.set_state(states["augment"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
