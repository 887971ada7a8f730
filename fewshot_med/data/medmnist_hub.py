"""Official MedMNIST datasets by name and size, through the ``medmnist`` package's download and cache."""

from __future__ import annotations

from pathlib import Path

from fewshot_med.data.dataset import MedicalImageDataset
from fewshot_med.data.npz import read_medmnist_npz
from fewshot_med.errors import DataError


def medmnist_root() -> Path:
    """The MedMNIST cache folder (``$MEDMNIST_ROOT`` or the package default ``~/.medmnist``)."""
    import os

    from medmnist.info import DEFAULT_ROOT

    return Path(os.environ.get("MEDMNIST_ROOT", DEFAULT_ROOT)).expanduser()


def load_medmnist(flag: str, size: int = 28, root: str | Path | None = None) -> MedicalImageDataset:
    """Load an official MedMNIST dataset, downloading it into the cache on first use.

    Args:
        flag: MedMNIST name, e.g. ``dermamnist`` or ``bloodmnist``.
        size: image size, one of the sizes MedMNIST publishes for that flag (28, 64, 128, 224).
        root: cache folder; defaults to ``medmnist_root()``.

    Returns:
        The dataset, class names as in ``medmnist.INFO[flag]["label"]``.
    """
    import medmnist
    from medmnist.info import INFO

    if flag not in INFO:
        known = ", ".join(sorted(k for k in INFO if not k.endswith("3d")))
        raise DataError(f"unknown MedMNIST dataset '{flag}'; choose one of: {known}")
    dataset_class = getattr(medmnist, INFO[flag]["python_class"])
    if size not in dataset_class.available_sizes:
        raise DataError(
            f"MedMNIST '{flag}' has no size {size}; choose one of {dataset_class.available_sizes}"
        )
    root = Path(root).expanduser() if root else medmnist_root()
    root.mkdir(parents=True, exist_ok=True)
    file_name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    if not (root / file_name).is_file():
        try:
            dataset_class(split="train", download=True, root=str(root), size=size)
        except RuntimeError:
            url = INFO[flag]["url" if size == 28 else f"url_{size}"]
            raise DataError(
                f"could not download MedMNIST {file_name} (offline?); download {url} and place it "
                f"at {root / file_name}, or set MEDMNIST_ROOT to the folder that holds it"
            ) from None
    labels = INFO[flag]["label"]
    class_names = [labels[str(i)] for i in range(len(labels))]
    return read_medmnist_npz(root / file_name, class_names=class_names, name=f"{flag}_{size}")
