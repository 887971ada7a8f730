"""A tiny classifier that reads files (resnet10t at 16 px, ProtoNet on 3 demo images per rare class),
and the same classifier logged and registered in a temporary MLflow store."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_med import tracking
from fewshot_med.config import Config
from fewshot_med.data import ClassSubset, select_classes
from fewshot_med.data.demo import DEMO_NOVEL_CLASSES, make_demo_dataset
from fewshot_med.data.transforms import channel_stats
from fewshot_med.deploy import FewShotClassifier, Preprocessing, fit_classifier
from fewshot_med.methods import MethodContext, create_method
from fewshot_med.models import BackboneSpec, create_backbone
from fewshot_med.tracking._store import using_store

SIZE = 16
MODEL_NAME = "tiny-deploy"


@pytest.fixture(scope="session")
def rare() -> ClassSubset:
    """The demo's rare classes, test split, 16 px RGB."""
    dataset = make_demo_dataset(image_size=SIZE, images_per_common_class=40, images_per_rare_class=40)
    return select_classes(dataset, "test", DEMO_NOVEL_CLASSES)


def make_classifier(
    rare: ClassSubset, preprocessing: Preprocessing | None, abstain_below: float | None = None
) -> FewShotClassifier:
    """ProtoNet on a seeded random-init resnet10t, fitted on the first 3 images of each class."""
    torch.manual_seed(0)
    mean, std = channel_stats(rare.images)
    spec = BackboneSpec("resnet10t", 3, SIZE, mean, std)
    rows = np.concatenate([np.flatnonzero(rare.labels == c)[:3] for c in range(len(rare.class_names))])
    return fit_classifier(
        create_backbone(spec.name, spec.in_chans, SIZE),
        spec,
        create_method("protonet", MethodContext()),
        rare.images[rows],
        rare.labels[rows],
        rare.class_names,
        temperature=2.0,
        device=torch.device("cpu"),
        preprocessing=preprocessing,
        abstain_below=abstain_below,
    )


@pytest.fixture(scope="session")
def classifier(rare: ClassSubset) -> FewShotClassifier:
    """The tiny classifier with the preprocessing of its training data (16 px, 3 channels)."""
    return make_classifier(rare, Preprocessing(image_size=SIZE, channels=3))


def png_bytes(image: np.ndarray) -> bytes:
    """``(H, W)`` or ``(H, W, 3)`` uint8 encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


@dataclass(frozen=True)
class Registered:
    """A classifier registered in a temporary store."""

    store: str  # the store's tracking URI
    folder: Path  # the store folder (for MLFLOW_TRACKING_URI)
    model_uri: str  # the logged model (models:/<id>)
    registered_uri: str  # models:/NAME@champion
    run_id: str  # the pipeline run
    card: dict


@pytest.fixture(scope="session")
def registered(classifier: FewShotClassifier, tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """``classifier`` logged (with a model card) in a pipeline run's ``register`` stage and registered
    as ``tiny-deploy`` with alias ``champion``, in a store folder of its own."""
    folder = tmp_path_factory.mktemp("store")
    config = Config.model_validate(
        {"name": "deploy", "data": {"source": "demo"}, "tracking": {"tracking_uri": str(folder)}}
    )
    card = {"intended_use": "tests only", "classes": list(classifier.class_names), "metrics": {"acc": 0.5}}
    uri = tracking.tracking_uri(config.tracking)
    with using_store(uri), tracking.pipeline_run(config) as run, tracking.stage_run("register"):
        model_uri = tracking.log_classifier(classifier, card=card)
        tracking.register_model(model_uri, MODEL_NAME, "tests", 0.5, "val.5shot.accuracy")
    return Registered(uri, folder, model_uri, f"models:/{MODEL_NAME}@champion", run.run_id, card)


def dicom_bytes(pixels: np.ndarray) -> bytes:
    """A 12-bit grey DICOM file (secondary capture, explicit VR little endian) of ``(H, W)`` pixels."""
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    dataset.Modality = "OT"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()
