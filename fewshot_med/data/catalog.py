"""Named datasets and the one entry point that turns a dataset spec into a loaded dataset.

A spec is one of:
  * a catalogue name (``ham10000``, ``ham10000-28``, ``pbc``, …), found under the data root;
  * ``demo`` (generated, no download);
  * ``medmnist:<flag>`` or ``medmnist:<flag>@<size>`` (official MedMNIST via its package);
  * a path to a MedMNIST-format ``.npz`` file, a CSV manifest, or a folder of class subfolders.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fewshot_med.data.cache import StreamOptions
from fewshot_med.data.dataset import MedicalImageDataset
from fewshot_med.data.intensity import IntensityConfig
from fewshot_med.data.roles import ClassRoles
from fewshot_med.data.transforms import resize_images
from fewshot_med.errors import DataError

DATA_ROOT_ENV = "FEWSHOT_MED_DATA"


@dataclass(frozen=True)
class CatalogEntry:
    """A MedMNIST-format file under the data root, with its class names and default roles."""

    relative_path: str
    class_names: tuple[str, ...]
    roles: ClassRoles | None
    description: str


HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HAM10000_ROLES = ClassRoles(base=("bcc", "bkl", "mel", "nv"), novel=("akiec", "df", "vasc"))
PBC_CLASSES = (
    "basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet",
)  # fmt: skip
PBC_ROLES = ClassRoles(
    base=("eosinophil", "erythroblast", "ig", "neutrophil", "platelet"),
    novel=("basophil", "lymphocyte", "monocyte"),
)

CATALOG: dict[str, CatalogEntry] = {
    "ham10000": CatalogEntry(
        "ham10000_derma/ham10000_derma_64.npz", HAM10000_CLASSES, HAM10000_ROLES,
        "HAM10000 dermoscopy, 64 px, lesion-grouped 70/10/20 split",
    ),
    "ham10000-28": CatalogEntry(
        "ham10000_derma/ham10000_derma_28.npz", HAM10000_CLASSES, HAM10000_ROLES,
        "HAM10000 dermoscopy, 28 px (fast tests), lesion-grouped split",
    ),
    "pbc": CatalogEntry(
        "pbc_bloodcells/pbc_bloodcells_28.npz", PBC_CLASSES, PBC_ROLES,
        "PBC peripheral blood cells, 28 px, stratified 70/10/20 split",
    ),
    "breastmnist": CatalogEntry(
        "breastmnist/breastmnist.npz", ("malignant", "normal_benign"), None, "BreastMNIST ultrasound, 28 px"
    ),
    "pneumoniamnist": CatalogEntry(
        "pneumoniamnist/pneumoniamnist.npz", ("normal", "pneumonia"), None, "PneumoniaMNIST X-ray, 28 px"
    ),
    "retinamnist": CatalogEntry(
        "retinamnist/retinamnist.npz", tuple(f"dr_grade_{g}" for g in range(5)), None,
        "RetinaMNIST fundus, 28 px, diabetic-retinopathy grade",
    ),
}  # fmt: skip


def data_root() -> Path:
    """Where catalogue files live: ``$FEWSHOT_MED_DATA``, else ``../shared/data`` beside the checkout."""
    if DATA_ROOT_ENV in os.environ:
        return Path(os.environ[DATA_ROOT_ENV]).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    candidates = [Path.cwd() / "../shared/data", checkout / "../shared/data"]
    return next((c.resolve() for c in candidates if c.is_dir()), candidates[0].resolve())


def _catalog_entry_for_file(path: Path) -> CatalogEntry | None:
    """The catalogue entry whose file has this name, so a copied file keeps its class names."""
    return next((e for e in CATALOG.values() if Path(e.relative_path).name == path.name), None)


#: Side local images (folders, CSV manifests) and the demo are resized to when no size is set.
DEFAULT_IMAGE_SIZE = 64


@dataclass(frozen=True)
class LoadOptions:
    """How images are read and split. ``image_size`` resizes every source when set (``.npz`` and
    MedMNIST files keep their own size when unset, local images and the demo take
    ``DEFAULT_IMAGE_SIZE``); the split options apply to sources without splits of their own.
    ``intensity`` applies to local files (``.npz``, MedMNIST and the demo are uint8 already).
    ``volume_index`` picks the volume of 4D NIfTI files (refused without it); ``duplicates`` says what
    copies in a folder or manifest get (``error`` or ``keep_first``, see ``fewshot_med.data.local``);
    ``manifest_encoding`` is a CSV manifest's encoding (UTF-8 when unset); ``streaming`` says whether a
    folder or manifest is decoded once into the on-disk cache and mapped (``fewshot_med.data.cache``)."""

    image_size: int | None = None
    nifti_slice: int | None = None
    split_fractions: Sequence[float] = (0.7, 0.1, 0.2)
    split_seed: int = 0
    class_names: Sequence[str] | None = None
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    volume_index: int | None = None
    duplicates: str = "error"
    manifest_encoding: str | None = None
    streaming: StreamOptions = field(default_factory=StreamOptions)


def load_dataset(spec: str, options: LoadOptions | None = None) -> MedicalImageDataset:
    """Load the dataset a spec names (see the module docstring for the forms a spec takes), resized to
    ``options.image_size`` when set."""
    options = options or LoadOptions()
    dataset = _load(spec, options)
    if options.image_size is not None and dataset.image_shape[0] != options.image_size:
        return resize_dataset(dataset, options.image_size)
    return dataset


def _load(spec: str, options: LoadOptions) -> MedicalImageDataset:
    from fewshot_med.data.local import read_image_folder, read_manifest
    from fewshot_med.data.npz import read_medmnist_npz

    local = dict(
        image_size=options.image_size or DEFAULT_IMAGE_SIZE,
        nifti_slice=options.nifti_slice,
        fractions=options.split_fractions,
        seed=options.split_seed,
        intensity=options.intensity,
        volume_index=options.volume_index,
        duplicates=options.duplicates,
        streaming=options.streaming,
    )
    if spec == "demo":
        from fewshot_med.data.demo import make_demo_dataset

        return make_demo_dataset(image_size=options.image_size or DEFAULT_IMAGE_SIZE)
    if spec in CATALOG:
        entry = CATALOG[spec]
        path = data_root() / entry.relative_path
        if not path.is_file():
            raise DataError(
                f"dataset '{spec}' expects {entry.relative_path} under the data root {data_root()}; "
                f"set {DATA_ROOT_ENV} to the folder that holds it"
            )
        return read_medmnist_npz(path, options.class_names or entry.class_names, name=spec)
    if spec.startswith("medmnist:"):
        from fewshot_med.data.medmnist_hub import load_medmnist

        flag, _, size = spec.removeprefix("medmnist:").partition("@")
        if size and not size.isdigit():
            raise DataError(f"dataset spec '{spec}': size must be a number, e.g. medmnist:{flag}@64")
        return load_medmnist(flag, int(size or 28))
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".npz":
        entry = _catalog_entry_for_file(path)
        return read_medmnist_npz(path, options.class_names or (entry.class_names if entry else None))
    if path.suffix.lower() == ".csv":
        return read_manifest(path, **local, encoding=options.manifest_encoding)
    if path.is_dir():
        return read_image_folder(path, **local)
    raise DataError(
        f"dataset '{spec}' not found: give a catalogue name ({', '.join(CATALOG)}), 'demo', "
        "'medmnist:<name>[@size]', or an existing .npz file, .csv manifest or image folder"
    )


def default_roles(spec: str) -> ClassRoles | None:
    """The base/novel roles the catalogue defines for a spec, if any."""
    if spec == "demo":
        from fewshot_med.data.demo import DEMO_BASE_CLASSES, DEMO_NOVEL_CLASSES

        return ClassRoles(base=DEMO_BASE_CLASSES, novel=DEMO_NOVEL_CLASSES)
    entry = CATALOG.get(spec) or _catalog_entry_for_file(Path(spec))
    return entry.roles if entry else None


def resize_dataset(dataset: MedicalImageDataset, image_size: int) -> MedicalImageDataset:
    """Every split's ``(N, H, W, C)`` uint8 images resized to ``image_size`` (whole image, bilinear
    with antialiasing, as local images are read); labels, groups and names kept. The content digest
    follows the new pixels."""
    splits = {
        name: dataclasses.replace(split, images=resize_images(split.images, image_size))
        for name, split in dataset.splits.items()
    }
    return dataclasses.replace(dataset, splits=splits)
