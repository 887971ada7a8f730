"""Models in MLflow: backbones as PyTorch models (reloaded as trainable timm modules), their SWAG
posteriors as artifacts beside them, and adapted few-shot classifiers as pyfunc models that take images."""

from __future__ import annotations

import copy
import json
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from fewshot_med.tracking import names
from fewshot_med.tracking._store import using_store
from fewshot_med.tracking.runs import _target, download_stage_artifact, log_metrics, store_uri

if TYPE_CHECKING:
    from torch import nn

    from fewshot_med.config import TrackingConfig
    from fewshot_med.deploy.classifier import FewShotClassifier
    from fewshot_med.models import BackboneSpec
    from fewshot_med.priors import SwagPosterior

#: Batch size of the input example; 2, because ``torch.export`` fixes a batch dimension of size 1.
_EXAMPLE_BATCH = 2


def _pinned(package: str) -> str:
    """``package==<installed version>`` without a local build label (``+cu124``, ``+cpu``)."""
    return f"{package}=={metadata.version(package).split('+')[0]}"


def log_backbone(backbone: nn.Module, spec: BackboneSpec, name: str = names.BACKBONE_MODEL) -> str | None:
    """Log ``backbone`` to the current run as an MLflow PyTorch model (``pt2``, ``torch.export``).

    The model maps float32 ``(batch, in_chans, image_size, image_size)`` to ``(batch, num_features)``
    for any batch; the signature and an input example say so, ``spec`` is stored in the ``MLmodel``
    metadata, and the requirements are the installed torch and timm (no inference). The caller's
    module is left as is: a CPU copy in eval mode is exported.

    Returns:
        The model URI (``models:/<model_id>``) for ``mlflow.pytorch.load_model`` or ``load_backbone``;
        ``None`` when tracking is off.
    """
    if _target() is None:
        return None
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    model = copy.deepcopy(backbone).to("cpu", memory_format=torch.contiguous_format).eval()
    example = np.zeros((_EXAMPLE_BATCH, spec.in_chans, spec.image_size, spec.image_size), dtype=np.float32)
    float32 = np.dtype(np.float32)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(float32, (-1, spec.in_chans, spec.image_size, spec.image_size))]),
        outputs=Schema([TensorSpec(float32, (-1, model.num_features))]),
    )
    info = mlflow.pytorch.log_model(
        model,
        name=name,
        signature=signature,
        input_example=example,
        serialization_format="pt2",
        pip_requirements=[_pinned("torch"), _pinned("timm")],
        metadata={names.SPEC_METADATA_KEY: json.loads(json.dumps(spec.to_dict()))},
        tags={names.BACKBONE_TAG: spec.name},
    )
    return info.model_uri


def load_backbone(
    run_id_or_uri: str, name: str = names.BACKBONE_MODEL, settings: TrackingConfig | None = None
) -> tuple[nn.Module, BackboneSpec]:
    """Rebuild a backbone logged by ``log_backbone`` as a trainable timm module.

    Args:
        run_id_or_uri: a model URI (``models:/…``, ``runs:/<run_id>/<name>``) or the id of the run
            that logged it.
        name: the model's name in that run, when a run id is given.
        settings: the tracking section of a config (which store to read); see ``store_uri``.

    Returns:
        The backbone (CPU, train mode, weights of the logged model) and its spec.
    """
    import tempfile

    import mlflow
    from mlflow.models import Model

    from fewshot_med.models import BackboneSpec, create_backbone

    uri = run_id_or_uri if ":" in run_id_or_uri else f"runs:/{run_id_or_uri}/{name}"
    store = store_uri(settings)
    with tempfile.TemporaryDirectory(prefix="fewshot-med-backbone-") as folder, using_store(store):
        local = mlflow.artifacts.download_artifacts(uri, dst_path=folder, tracking_uri=store)
        spec = BackboneSpec.from_dict(Model.load(local).metadata[names.SPEC_METADATA_KEY])
        exported = mlflow.pytorch.load_model(local, map_location="cpu")
    backbone = create_backbone(spec.name, in_chans=spec.in_chans, image_size=spec.image_size)
    backbone.load_state_dict(exported.state_dict())
    return backbone, spec


def log_swag(posterior: SwagPosterior) -> None:
    """Log a SWAG posterior to the current run as ``swag/posterior.pt``, with metrics ``swag.rank`` (the
    deviations kept, ``K``) and ``swag.n_snapshots``; nothing when tracking is off.

    The file holds ``posterior.state_dict()`` (tensors and lists: ``torch.load(…, weights_only=True)``
    reads it); ``load_swag`` reads it back.
    """
    target = _target()
    if target is None:
        return
    import tempfile

    import mlflow
    import torch

    with tempfile.TemporaryDirectory(prefix="fewshot-med-swag-") as folder:
        local = Path(folder) / Path(names.SWAG_POSTERIOR).name
        torch.save(posterior.state_dict(), local)
        mlflow.log_artifact(str(local), str(Path(names.SWAG_POSTERIOR).parent), run_id=target)
    log_metrics({names.SWAG_RANK: posterior.rank, names.SWAG_SNAPSHOTS: posterior.n_snapshots}, run_id=target)


def load_swag(run_id: str, settings: TrackingConfig | None = None) -> SwagPosterior | None:
    """The SWAG posterior logged by ``log_swag`` in a run's pretrain stage, or ``None`` if it has none.

    Args:
        run_id: a pipeline run (its latest finished ``pretrain`` stage run is read) or the stage run
            itself. The posterior is over the pretrained backbone, before any meta-training.
        settings: the tracking section of a config (which store to read); see ``store_uri``.
    """
    import tempfile

    import torch

    from fewshot_med.priors import SwagPosterior

    with tempfile.TemporaryDirectory(prefix="fewshot-med-swag-") as folder:
        local = download_stage_artifact(run_id, names.PRETRAIN, names.SWAG_POSTERIOR, Path(folder), settings)
        if local is None:
            return None
        state = torch.load(local, map_location="cpu", weights_only=True)
    return SwagPosterior.from_state_dict(state)


def log_classifier(classifier: FewShotClassifier, name: str = names.CLASSIFIER_MODEL) -> str | None:
    """Log a ``FewShotClassifier`` to the current run as an MLflow pyfunc model.

    ``mlflow.pyfunc.load_model(uri).predict(images)`` takes ``(N, H, W, C)`` uint8 images (as in the
    training data) and returns a table with one probability column per class and ``prediction``,
    the most probable class. The ``fewshot_med`` package travels with the model (``code_paths``), so
    it loads wherever torch, timm and scikit-learn are installed.

    Returns:
        The model URI, or ``None`` when tracking is off.
    """
    if _target() is None:
        return None
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    import fewshot_med
    from fewshot_med.tracking.pyfunc import ClassifierModel

    size, channels = classifier.spec.image_size, classifier.spec.in_chans
    example = np.zeros((_EXAMPLE_BATCH, size, size, 3 if channels == 3 else 1), dtype=np.uint8)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, example.shape[-1]))]),
        outputs=Schema(
            [*(ColSpec("double", c) for c in classifier.class_names), ColSpec("string", "prediction")]
        ),
    )
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=ClassifierModel(classifier),
        signature=signature,
        input_example=example,
        code_paths=[str(Path(fewshot_med.__file__).parent)],
        pip_requirements=[_pinned(p) for p in ("torch", "timm", "scikit-learn", "numpy", "pandas", "scipy")],
        metadata={names.SPEC_METADATA_KEY: json.loads(json.dumps(classifier.spec.to_dict()))},
    )
    return info.model_uri
