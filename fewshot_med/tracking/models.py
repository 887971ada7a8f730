"""Models in MLflow: backbones as PyTorch models (reloaded as trainable timm modules), their SWAG
posteriors as artifacts beside them, and adapted few-shot classifiers as pyfunc models that take images."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewshot_med.errors import FewshotMedError
from fewshot_med.tracking import names
from fewshot_med.tracking._store import using_store
from fewshot_med.tracking.runs import (
    _target,
    download_stage_artifact,
    find_stage_run,
    log_metrics,
    model_tags,
    redact_text,
    store_uri,
)

if TYPE_CHECKING:
    from mlflow.models import ModelSignature
    from torch import nn

    from fewshot_med.config import TrackingConfig
    from fewshot_med.deploy.classifier import FewShotClassifier
    from fewshot_med.models import BackboneSpec
    from fewshot_med.priors import SwagPosterior

#: Batch size of the input example; 2, because ``torch.export`` fixes a batch dimension of size 1.
_EXAMPLE_BATCH = 2
#: What a served classifier imports: the model, its methods, and the readers of image files.
_CLASSIFIER_REQUIREMENTS = (
    "torch",
    "timm",
    "scikit-learn",
    "numpy",
    "pandas",
    "scipy",
    "pydantic",
    "monai",
    "pydicom",
    "nibabel",
    "pillow",
)


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
        tags={**model_tags(), names.BACKBONE_TAG: spec.name},
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


def load_run_backbone(run_id: str, settings: TrackingConfig | None = None) -> tuple[nn.Module, BackboneSpec]:
    """The backbone an earlier run produced: its meta-trained one if any, else its pretrained one, else
    a backbone logged on the run itself (``run_id`` may be a pipeline run or a stage run).

    Raises:
        FewshotMedError: the run holds no backbone model.
    """
    from fewshot_med.errors import FewshotMedError

    for stage in (names.META_TRAIN, names.PRETRAIN):
        child = find_stage_run(run_id, stage, settings)
        if child is not None:
            return load_backbone(child, settings=settings)
    try:
        return load_backbone(run_id, settings=settings)
    except Exception as error:
        raise FewshotMedError(
            f"run {run_id} holds no backbone model ({type(error).__name__}); pass the id of a run "
            "that ran the pretrain or meta-train stage (see `fewshot-med ui`)"
        ) from None


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


def log_classifier(
    classifier: FewShotClassifier, name: str = names.CLASSIFIER_MODEL, card: Mapping[str, Any] | None = None
) -> str | None:
    """Log a ``FewShotClassifier`` to the current run as an MLflow pyfunc model.

    With preprocessing, ``mlflow.pyfunc.load_model(uri).predict(table)`` takes a one-column DataFrame
    (``path``: file paths; ``image``: encoded files as bytes or base64, which ``mlflow models serve``
    decodes) and returns ``FewShotClassifier.predict_table``: one probability column per class,
    ``prediction``, ``confidence``, ``abstain`` and ``error``; the signature says so and the input
    example is a small PNG. Without preprocessing it takes ``(N, S, S, C)`` uint8 arrays of the
    training size. The ``fewshot_med`` package travels with the model (``code_paths``), so it loads
    wherever torch, timm and scikit-learn are installed; preprocessing, abstention threshold, backbone
    spec and ``card`` are kept in the ``MLmodel`` metadata (``names.*_METADATA_KEY``).

    Args:
        classifier: the classifier (pickled whole into the model).
        name: the logged model's name in the run.
        card: a model card (JSON-able), also logged as the model's ``model_card.json`` and
            ``model_card.md`` artifacts. It must hold no data paths or patient data.

    Returns:
        The model URI, or ``None`` when tracking is off.
    """
    if _target() is None:
        return None
    import tempfile

    import mlflow

    import fewshot_med
    from fewshot_med.tracking.pyfunc import ClassifierModel

    signature, example = _classifier_signature(classifier)
    preprocessing = classifier.preprocessing
    metadata = {
        names.SPEC_METADATA_KEY: classifier.spec.to_dict(),
        names.PREPROCESSING_METADATA_KEY: preprocessing.to_dict() if preprocessing else None,
        names.ABSTAIN_METADATA_KEY: classifier.abstain_below,
        **({names.CARD_METADATA_KEY: dict(card)} if card is not None else {}),
    }
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=ClassifierModel(classifier),
        signature=signature,
        input_example=example,
        code_paths=[str(Path(fewshot_med.__file__).parent)],
        pip_requirements=[_pinned(p) for p in _CLASSIFIER_REQUIREMENTS],
        metadata=json.loads(json.dumps(metadata, default=str)),
        tags=model_tags(),
    )
    if card is not None:
        with tempfile.TemporaryDirectory(prefix="fewshot-med-card-") as folder:
            (Path(folder) / names.MODEL_CARD_JSON).write_text(
                redact_text(json.dumps(card, indent=2, default=str))
            )
            (Path(folder) / names.MODEL_CARD).write_text(redact_text(card_markdown(card)))
            mlflow.MlflowClient().log_model_artifacts(info.model_id, folder)
    return info.model_uri


def _classifier_signature(classifier: FewShotClassifier) -> tuple[ModelSignature, Any]:
    """The signature and input example: file paths or encoded files in, the prediction table out; a
    classifier without preprocessing keeps the uint8-array input of the training size."""
    import io

    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    from PIL import Image

    from fewshot_med.tracking.pyfunc import IMAGE_COLUMN, PATH_COLUMN

    outputs = Schema(
        [
            *(ColSpec("double", c) for c in classifier.class_names),
            ColSpec("string", "prediction"),
            ColSpec("double", "confidence"),
            ColSpec("boolean", "abstain"),
            ColSpec("string", "error"),
        ]
    )
    size = classifier.spec.image_size
    preprocessing = classifier.preprocessing
    if preprocessing is None:
        channels = 3 if classifier.spec.in_chans == 3 else 1
        example = np.zeros((_EXAMPLE_BATCH, size, size, channels), dtype=np.uint8)
        inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, channels))])
        return ModelSignature(inputs=inputs, outputs=outputs), example
    ramp = np.linspace(0, 255, size * size, dtype=np.uint8).reshape(size, size)
    pixels = np.repeat(ramp[..., None], 3, axis=-1) if preprocessing.channels == 3 else ramp
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    inputs = Schema(
        [ColSpec("string", PATH_COLUMN, required=False), ColSpec("binary", IMAGE_COLUMN, required=False)]
    )
    return ModelSignature(inputs=inputs, outputs=outputs), pd.DataFrame({IMAGE_COLUMN: [png.getvalue()]})


def card_markdown(card: Mapping[str, Any]) -> str:
    """A model card as markdown: a section per top-level key; lists as bullets, mappings as
    ``key: value`` bullets, anything deeper as JSON."""

    def render(value: Any) -> str:
        if isinstance(value, Mapping):
            return "\n".join(f"- **{key}**: {_inline(item)}" for key, item in value.items())
        if isinstance(value, (list, tuple)):
            return "\n".join(f"- {_inline(item)}" for item in value)
        return str(value)

    sections = [f"## {key}\n\n{render(value)}" for key, value in card.items()]
    return "\n\n".join(["# Model card", *sections]) + "\n"


def _inline(value: Any) -> str:
    """A value on one line: strings as they are, anything else as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _classifier_uri(run_id_or_uri: str, name: str, settings: TrackingConfig | None) -> str:
    """A model URI as given, or ``runs:/…/<name>`` of a run id (of its ``register`` stage when it has one)."""
    if ":" in run_id_or_uri:
        return run_id_or_uri
    return f"runs:/{find_stage_run(run_id_or_uri, names.REGISTER, settings) or run_id_or_uri}/{name}"


def load_model_card(
    run_id_or_uri: str, name: str = names.CLASSIFIER_MODEL, settings: TrackingConfig | None = None
) -> dict[str, Any] | None:
    """The model card a classifier was logged with (``log_classifier(card=…)``), or ``None``; the same
    URIs and run ids as ``load_classifier``."""
    import mlflow

    with using_store(store_uri(settings)):
        info = mlflow.models.get_model_info(_classifier_uri(run_id_or_uri, name, settings))
    return (info.metadata or {}).get(names.CARD_METADATA_KEY)


def load_classifier(
    run_id_or_uri: str, name: str = names.CLASSIFIER_MODEL, settings: TrackingConfig | None = None
) -> FewShotClassifier:
    """The ``FewShotClassifier`` inside a model logged by ``log_classifier``.

    Args:
        run_id_or_uri: a model URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/<id>``,
            ``runs:/<run_id>/<name>``), or the id of the run that logged it, or of the pipeline run
            whose ``register`` stage did.
        name: the model's name in that run, when a run id is given.
        settings: the tracking section of a config (which store to read); see ``store_uri``.

    Raises:
        FewshotMedError: the store holds no such model, or it is not a fewshot-med classifier.
    """
    import mlflow
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    from mlflow.exceptions import MlflowException

    from fewshot_med.tracking.pyfunc import ClassifierModel

    store = store_uri(settings)
    uri = _classifier_uri(run_id_or_uri, name, settings)
    bar = os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set("false")  # a bar per downloaded file would flood stderr
    try:
        with using_store(store):
            model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except (MlflowException, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FewshotMedError(
            f"cannot load model {run_id_or_uri} from the MLflow store {store} ({reason}); give "
            "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/classifier or a run id, and point "
            "MLFLOW_TRACKING_URI at the store that holds it"
        ) from None
    finally:
        if bar is None:
            MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.unset()
        else:
            MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(bar)
    if not isinstance(model, ClassifierModel):
        raise FewshotMedError(f"{run_id_or_uri} is a {type(model).__name__}, not a fewshot-med classifier")
    return model.classifier
