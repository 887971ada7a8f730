"""``audit_dataset``: every check of the audit, in order, on one data source."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fewshot_med import tracking
from fewshot_med.audit.classes import find_small_classes
from fewshot_med.audit.duplicates import DuplicateLimits, find_duplicates
from fewshot_med.audit.features import CHEAP_DESCRIPTION, backbone_features, cheap_features
from fewshot_med.audit.files import FileLimits, scan_files
from fewshot_med.audit.findings import AuditReport, Finding
from fewshot_med.audit.inventory import Inventory, list_items
from fewshot_med.audit.labels import LabelSettings, find_label_issues
from fewshot_med.audit.ood import GaussianReference, find_out_of_distribution, fit_reference
from fewshot_med.audit.patients import find_patient_leaks
from fewshot_med.data import SPLITS, LoadOptions, MedicalImageDataset, Split, load_dataset, select_classes
from fewshot_med.data.catalog import DEFAULT_IMAGE_SIZE
from fewshot_med.data.local import _natural_key
from fewshot_med.data.splits import assign_splits
from fewshot_med.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fewshot_med.config import TrackingConfig
    from fewshot_med.models import BackboneSpec

FILE_CHECKS = (
    "empty_file", "not_an_image", "wrong_extension", "truncated", "unreadable", "tiny_image", "huge_image",
    "extreme_aspect",
)  # fmt: skip


@dataclass(frozen=True)
class AuditSettings:
    """What the audit checks and how strictly.

    Attributes:
        shots: the Ks the class sizes are checked for.
        image_size: side images are decoded to; default the backbone's, else 64 for files, while array
            datasets keep theirs.
        files: sizes flagged as tiny, huge or extreme in aspect.
        duplicates: when two images count as the same.
        labels: folds and neighbours of the label checks; ``None`` skips them (they are the slow part and
            find no errors, only suspects: a caller that only needs ``errors()`` can skip them).
        ood_quantile: quantile of the reference's own Mahalanobis scores above which an image is flagged.
    """

    shots: tuple[int, ...] = (1, 5, 10)
    image_size: int | None = None
    files: FileLimits = field(default_factory=FileLimits)
    duplicates: DuplicateLimits = field(default_factory=DuplicateLimits)
    labels: LabelSettings | None = field(default_factory=LabelSettings)
    ood_quantile: float = 0.99


class _Clock:
    """Wall time per named step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def audit_dataset(
    source: str | Path,
    settings: AuditSettings | None = None,
    from_run: str | None = None,
    reference: str | None = None,
    backbone: tuple[nn.Module, BackboneSpec] | None = None,
    tracking_settings: TrackingConfig | None = None,
    device: str = "auto",
) -> AuditReport:
    """Audit a dataset before training: files, duplicates and leaks, label errors, class sizes and (with a
    backbone) out-of-distribution images.

    Args:
        source: a folder of class subfolders, a CSV manifest, or a spec ``load_dataset`` takes (``ham10000``).
        settings: thresholds and Ks.
        from_run: MLflow run whose backbone gives the features (``fewshot-med evaluate --from``'s lookup).
        reference: with a backbone, the data the out-of-distribution scores are relative to: a YAML config
            (the base classes of its train split, the run's pretraining data) or a dataset spec (its train
            split); default the audited data's own train split.
        backbone: a loaded ``(backbone, spec)`` instead of ``from_run``.
        tracking_settings: which MLflow store ``from_run`` is in (default ``store_uri()``).
        device: where the backbone runs (``auto``, ``cpu``, ``cuda``).

    Returns:
        The report; ``report.errors()`` lists what must be fixed before training.

    Raises:
        FewshotMedError: the source, run or reference cannot be used (raised before any slow check).
    """
    settings = settings or AuditSettings()
    if not settings.shots or min(settings.shots) < 1:
        raise ConfigError(f"shots {list(settings.shots)}: give one or more K >= 1")
    if reference is not None and backbone is None and from_run is None:
        raise ConfigError(
            f"--reference {reference}: the out-of-distribution check needs a backbone; add --from"
        )
    clock = _Clock()
    with clock.step("listing"):
        if backbone is None and from_run is not None:
            backbone = tracking.load_run_backbone(from_run, tracking_settings)
        image_size = settings.image_size or (backbone[1].image_size if backbone else None)
        inventory = list_items(source, image_size)
        reference_data = _reference_data(reference) if reference is not None else None
    findings: list[Finding] = list(inventory.findings)
    not_run: dict[str, str] = {}
    with clock.step("files"):
        if inventory.has_files:
            scan = scan_files(inventory.items, image_size or DEFAULT_IMAGE_SIZE, settings.files)
            images, readable, byte_digests = scan.images, scan.readable, scan.byte_digests
            findings += scan.findings
        else:
            images, readable, byte_digests = inventory.images, np.ones(len(inventory.items), bool), None
            not_run.update({check: "the data are arrays, not files" for check in FILE_CHECKS})
        digest = _digest(inventory, images, readable)
    torch_device = _device(device) if backbone else None
    with clock.step("features"):
        if backbone:
            embedded = backbone_features(*backbone, images[readable], torch_device)
            features = np.zeros((len(readable), embedded.shape[1]), np.float32)
            features[readable] = embedded
            name = f"run {from_run}" if from_run else "the given backbone"
            description = (
                f"backbone features of {name} ({backbone[1].name}, {backbone[1].image_size} px, "
                f"{embedded.shape[1]} dimensions)"
            )
        else:
            features, description = cheap_features(images), CHEAP_DESCRIPTION
    with clock.step("duplicates"):
        findings += find_patient_leaks(inventory.items)
        findings += find_duplicates(
            inventory.items,
            images,
            readable,
            byte_digests,
            features if backbone else None,
            settings.duplicates,
        )
    notes: list[str] = []
    with clock.step("labels"):
        if settings.labels is not None:
            label_findings, notes = find_label_issues(
                inventory.items, features, readable, inventory.class_names, settings.labels
            )
            findings += label_findings
        else:
            not_run.update(dict.fromkeys(("label_issue", "knn_disagreement"), "switched off (labels=None)"))
    with clock.step("classes"):
        findings += find_small_classes(inventory.items, readable, inventory.class_names, settings.shots)
    with clock.step("out_of_distribution"):
        if backbone:
            try:
                fitted = _reference(
                    inventory, features, readable, reference_data, backbone, settings, torch_device
                )
                findings += find_out_of_distribution(inventory.items, features, readable, fitted)
            except DataError as error:
                if reference_data is not None:  # the user's reference cannot be used: say so
                    raise
                not_run["out_of_distribution"] = str(error)
        else:
            not_run["out_of_distribution"] = "needs a backbone: pass --from RUN_ID"
    if not backbone:
        notes.append(
            "near duplicates in feature space need a backbone (--from RUN_ID); "
            "pixels and perceptual hashes were compared"
        )
    if not inventory.splits_given:
        notes.append(
            "the data give no splits: the toolkit assigns them (patient-grouped when patient ids are given), "
            "so every `duplicate` may end up in two splits; remove copies before training"
        )
    return AuditReport(
        name=inventory.name,
        source=inventory.source,
        n_items=len(inventory.items),
        class_names=inventory.class_names,
        features=description,
        findings=tuple(findings),
        path_items=_path_items(inventory),
        digest=digest,
        settings=_settings_summary(settings, image_size or DEFAULT_IMAGE_SIZE, inventory),
        seconds=clock.seconds,
        notes=tuple(notes),
        not_run=not_run,
    )


def _device(name: str) -> torch.device:
    from fewshot_med.runtime import resolve_device

    return resolve_device(name)


def _path_items(inventory: Inventory) -> frozenset[str]:
    """Names that are paths (or taken from one): the source and the dataset name taken from it when the
    source is a file or folder, and every file item."""
    names = {inventory.source, inventory.name} if Path(inventory.source).expanduser().exists() else set()
    if inventory.has_files:
        names |= {item.name for item in inventory.items} | {finding.item for finding in inventory.findings}
    return frozenset(names)


def _settings_summary(settings: AuditSettings, image_size: int, inventory: Inventory) -> dict[str, object]:
    limits, duplicates, labels = settings.files, settings.duplicates, settings.labels
    summary: dict[str, object] = {"shots": ",".join(map(str, sorted(settings.shots)))}
    if inventory.has_files:
        summary |= {
            "image_size": image_size,
            "min_side": limits.min_side,
            "max_side": limits.max_side,
            "max_aspect": limits.max_aspect,
        }
    return summary | {
        "phash_distance": duplicates.phash_distance,
        "max_pixel_difference": duplicates.max_pixel_difference,
        "feature_cosine": duplicates.feature_cosine,
        **({"folds": labels.folds, "neighbours": labels.neighbours} if labels else {}),
        "ood_quantile": settings.ood_quantile,
    }


def _digest(inventory: Inventory, images: np.ndarray, readable: np.ndarray) -> str | None:
    """``MedicalImageDataset.digest`` of the readable images, labelled and split as
    ``fewshot_med.data.local`` does it (given splits, else ``assign_splits`` with the default fractions and
    seed): equal to the ``data.digest`` tag of runs on the same data at the same image size when every
    file reads; ``None`` when no split can be assigned."""
    if inventory.digest is not None:
        return inventory.digest
    keep = np.flatnonzero(readable)
    items = [inventory.items[i] for i in keep]
    if not items:
        return None
    class_names = sorted({item.label for item in items}, key=_natural_key)
    labels = np.asarray([class_names.index(item.label) for item in items], dtype=np.int64)
    groups = (
        np.asarray([item.patient or "" for item in items], dtype=str) if inventory.patients_given else None
    )
    if inventory.splits_given:
        split_of = np.asarray([item.split for item in items], dtype=str)
    else:
        options = LoadOptions()
        try:
            split_of = assign_splits(labels, groups, options.split_fractions, options.split_seed)
        except DataError:
            return None
    splits = {
        split: Split(
            images=images[keep][split_of == split],
            labels=labels[split_of == split],
            groups=None if groups is None else groups[split_of == split],
        )
        for split in SPLITS
    }
    return MedicalImageDataset(inventory.name, tuple(class_names), splits, inventory.source).digest


def _reference(
    inventory: Inventory,
    features: np.ndarray,
    readable: np.ndarray,
    reference_data: _ReferenceData | None,
    backbone: tuple[nn.Module, BackboneSpec],
    settings: AuditSettings,
    device: torch.device,
) -> GaussianReference:
    """The class Gaussians the Mahalanobis scores are measured against (see ``audit_dataset``)."""
    if reference_data is None:
        in_train = np.asarray([item.split in ("train", None) for item in inventory.items]) & readable
        labels = np.asarray([inventory.class_names.index(item.label) for item in inventory.items])
        description = "the audited data's own train split (self-reference: about 1% is flagged by design)"
        return fit_reference(
            features[in_train].astype(np.float64), labels[in_train], settings.ood_quantile, description
        )
    if reference_data.digest == inventory.digest:  # the audited arrays themselves: reuse their features
        position = {item.name: index for index, item in enumerate(inventory.items)}
        embedded = features[[position[f"train[{row}]"] for row in reference_data.rows]]
    else:
        embedded = backbone_features(*backbone, reference_data.images, device)
    return fit_reference(
        embedded.astype(np.float64), reference_data.labels, settings.ood_quantile, reference_data.description
    )


@dataclass(frozen=True)
class _ReferenceData:
    """Reference images: ``(N, H, W, C)`` pixels, ``(N,)`` labels, their rows in the train split of the
    dataset with ``digest``, and a description for the report."""

    images: np.ndarray
    labels: np.ndarray
    rows: np.ndarray
    digest: str
    description: str


def _reference_data(reference: str) -> _ReferenceData:
    """A config's base classes of the train split (its pretraining data), or a dataset spec's train split."""
    if reference.lower().endswith((".yaml", ".yml")):
        from fewshot_med.config import load_config

        config = load_config(reference)
        dataset = load_dataset(config.data.source, config.data.load_options())
        roles = config.roles()
        roles.check(dataset.class_names, reference)
        subset = select_classes(dataset, "train", roles.base)
        description = f"the base classes of the train split of config '{config.name}'"
        return _ReferenceData(subset.images, subset.labels, subset.indices, dataset.digest, description)
    dataset = load_dataset(reference)
    split = dataset.splits["train"]
    if len(split) == 0:
        raise DataError(f"--reference {reference}: its train split is empty; pick data with training images")
    rows = np.arange(len(split))
    return _ReferenceData(
        split.images, split.labels, rows, dataset.digest, "the train split of the --reference data"
    )
