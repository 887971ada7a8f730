"""A registered classifier as a MONAI bundle (MONAI Bundle specification,
https://docs.monai.io/en/latest/mb_specification.html): ``configs/metadata.json``,
``configs/inference.json``, ``models/model.ts`` (TorchScript) and ``docs/README.md``, which
``python -m monai.bundle run --config_file configs/inference.json --dataset_dir DIR --output_dir OUT``
runs on a folder of images, giving the probabilities of ``FewShotClassifier.predict_table``.

Reading uses this toolkit, not MONAI-native transforms: ``read_image`` picks a reader by suffix,
treats 8-bit photographs and other files differently (``to_byte_range``), resizes with torch's
antialiased bilinear interpolation and rounds to uint8. ``LoadImaged``, ``ScaleIntensityRange…d`` and
``Resized`` (Gaussian anti-aliasing) do not reproduce that bit for bit, so the bundle's config calls
``read_item`` here, and the bundle needs ``fewshot-med`` installed for reading; the network itself is
plain TorchScript.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fewshot_med.deploy.batch import expand_inputs
from fewshot_med.deploy.classifier import FewShotClassifier
from fewshot_med.deploy.preprocess import Preprocessing, load_inputs
from fewshot_med.errors import DataError, FewshotMedError
from fewshot_med.models.views import view_features

#: Bundle files, relative to the bundle folder.
METADATA_FILE = "configs/metadata.json"
INFERENCE_FILE = "configs/inference.json"
LOGGING_FILE = "configs/logging.conf"
MODEL_FILE = "models/model.ts"
README_FILE = "docs/README.md"
#: What the bundle writes into ``--output_dir``: one row per file, as ``fewshot-med predict`` writes.
PREDICTIONS_FILE = "predictions.csv"
#: Images per forward pass in the bundle (the traced network is checked at this batch size).
BUNDLE_BATCH_SIZE = 16
#: The JSON schema MONAI's ``verify_metadata`` checks ``metadata.json`` against.
METADATA_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
#: Largest difference to ``predict_proba`` the traced network may show.
TRACE_TOLERANCE = 1e-5
#: What the bundle needs besides monai, torch and numpy: fewshot-med reads the files, pydicom and
#: nibabel open DICOM and NIfTI, pillow PNG and JPEG, fire runs ``python -m monai.bundle``.
REQUIRED_PACKAGES = ("fewshot-med", "pydicom", "nibabel", "pillow", "fire")
#: MONAI's default logging configuration for bundles: INFO and above to stdout.
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

_logger = logging.getLogger(__name__)


class ProbabilityNetwork(nn.Module):
    """A classifier as one network: ``(B, C, S, S)`` float pixels in 0..255 (``C`` the channels of its
    preprocessing) -> ``(B, n_classes)`` float64 calibrated probabilities.

    Normalises with ``spec.mean``/``spec.std`` (as ``to_model_input``), embeds with the backbone (over the
    test-time views ``spec.views``) for
    frozen-feature methods, scores with the fitted method, divides the logits by the temperature and
    applies a softmax, as ``FewShotClassifier.predict_proba`` does.
    """

    def __init__(self, classifier: FewShotClassifier) -> None:
        super().__init__()
        spec = classifier.spec
        self.backbone = classifier.backbone.eval()
        self.method = classifier.method
        self.in_chans = spec.in_chans
        self.views = spec.views
        self.temperature = classifier.temperature
        self.embeds = classifier.method.inputs == "features"
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = (images.float().div(255) - self.mean) / self.std
        if batch.shape[1] != self.in_chans:
            batch = (
                batch.mean(dim=1, keepdim=True)
                if self.in_chans == 1
                else batch.expand(-1, self.in_chans, -1, -1)
            )
        inputs = view_features(self.backbone, batch, self.views).float() if self.embeds else batch
        return torch.softmax(self.method.predict_logits(inputs).double() / self.temperature, dim=1)


def trace_network(
    classifier: FewShotClassifier, batch_size: int = BUNDLE_BATCH_SIZE, seed: int = 0
) -> torch.jit.ScriptModule:
    """``ProbabilityNetwork(classifier)`` traced with ``torch.jit.trace`` on the CPU, checked against
    ``classifier.predict_proba`` on seeded random images in batches of 1, 3 and ``batch_size``.

    Tracing records the tensor operations of one call; a method that leaves torch (numpy, scikit-learn)
    or whose operations depend on the batch size gives a network that disagrees on other images or
    batches, and is refused.

    Raises:
        FewshotMedError: the classifier cannot read files (no preprocessing), its method is
            transductive (a query's probabilities depend on the other queries), or the traced network
            fails or differs from ``predict_proba`` by more than ``TRACE_TOLERANCE``.
    """
    method = classifier.method.name
    _check_exportable(classifier)
    preprocessing = classifier.preprocessing
    assert preprocessing is not None  # _check_exportable
    size, channels = preprocessing.image_size, preprocessing.channels
    generator = np.random.default_rng(seed)

    def images(count: int) -> np.ndarray:
        return generator.integers(0, 256, (count, size, size, channels), dtype=np.uint8)

    def as_input(batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(batch).permute(0, 3, 1, 2).float()

    network = ProbabilityNetwork(classifier).cpu().eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # tracer warnings flag the methods' Python-side input checks; the comparison below decides
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(network, as_input(images(2)), check_trace=False)
            for count in (1, 3, batch_size):
                batch = images(count)
                gap = np.abs(traced(as_input(batch)).numpy() - classifier.predict_proba(batch)).max()
                if not gap <= TRACE_TOLERANCE:
                    raise ValueError(f"probabilities differ by {gap:.2g} on a batch of {count}")
    except (RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise FewshotMedError(
            f"method '{method}' cannot be exported as TorchScript: its traced network does not reproduce "
            f"the classifier ({reason}); serve it with fewshot-med predict or mlflow models serve instead"
        ) from None
    return traced


def _check_exportable(classifier: FewShotClassifier) -> None:
    """Refuse, before any tracing, classifiers a per-file bundle cannot carry."""
    method = classifier.method.name
    if classifier.method.transductive:
        raise FewshotMedError(
            f"method '{method}' is transductive (a query's probabilities depend on the other queries), so "
            "it has no per-file network to export; adapt with an inductive method"
        )
    if classifier.preprocessing is None:
        raise FewshotMedError(
            "this classifier was saved without preprocessing, so it cannot read image files; refit it "
            "with a Preprocessing (fewshot-med adapt does) to export it"
        )


def write_bundle(
    classifier: FewShotClassifier,
    out: Path,
    source: str,
    card: Mapping[str, Any] | None = None,
    batch_size: int = BUNDLE_BATCH_SIZE,
) -> Path:
    """Write ``classifier`` as a MONAI bundle in the new or empty folder ``out``.

    Args:
        classifier: a classifier with preprocessing and an inductive method.
        out: the bundle folder; created, or empty.
        source: where the classifier came from (its model URI), recorded in the metadata.
        card: the model card logged with the classifier, if any (no paths or patient data in it).
        batch_size: images per forward pass when the bundle runs.

    Returns:
        ``out``.

    Raises:
        FewshotMedError: ``out`` is a file or a non-empty folder, or the classifier cannot be
            exported (see ``trace_network``); checked before anything is written.
    """
    check_bundle_folder(out)
    traced = trace_network(classifier, batch_size)
    meta = bundle_metadata(classifier, source, card)
    config = inference_config(classifier, batch_size)
    files = {
        METADATA_FILE: json.dumps(meta, indent=2) + "\n",
        INFERENCE_FILE: json.dumps(config, indent=2) + "\n",
        LOGGING_FILE: LOGGING_CONF,
        README_FILE: bundle_readme(meta),
    }
    for relative, text in files.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_text(text, encoding="utf-8")
    from monai.data import save_net_with_metadata

    (out / MODEL_FILE).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch deprecates TorchScript, the format of MONAI bundles
        warnings.filterwarnings("ignore", message=".*torch.jit.save.* is deprecated", category=FutureWarning)
        save_net_with_metadata(
            traced,
            str(out / MODEL_FILE),
            include_config_vals=False,
            meta_values=meta,
            more_extra_files={"inference.json": files[INFERENCE_FILE].encode()},
        )
    return out


def check_bundle_folder(out: Path) -> None:
    """Raise ``FewshotMedError`` unless ``out`` is missing or an empty folder (a bundle never mixes
    with other files, and an export never overwrites one)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        kind = "is a non-empty folder" if out.is_dir() else "is a file"
        raise FewshotMedError(f"{out} {kind}; give a new or empty folder for the bundle")


def bundle_metadata(
    classifier: FewShotClassifier, source: str, card: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``configs/metadata.json``: versions, task, input and output format (class names as the output
    channels), intended use and limits, the preprocessing, and the model card when there is one."""
    import monai

    from fewshot_med import __version__

    preprocessing = classifier.preprocessing
    assert preprocessing is not None  # trace_network refused it otherwise
    size, channels = preprocessing.image_size, preprocessing.channels
    names = list(classifier.class_names)
    channel_def = {"0": "red", "1": "green", "2": "blue"} if channels == 3 else {"0": "grey"}
    threshold = classifier.abstain_below
    return {
        "schema": METADATA_SCHEMA,
        "version": "1.0.0",
        "changelog": {"1.0.0": f"exported by fewshot-med {__version__} from {source}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {name: _version(name) for name in REQUIRED_PACKAGES},
        "name": f"fewshot-med {classifier.method.name} classifier",
        "task": f"Classify a 2D medical image into one of {len(names)} classes: {', '.join(names)}",
        "description": (
            f"A {classifier.spec.name} backbone with a {classifier.method.name} few-shot classifier fitted "
            f"on a small labelled set, calibrated by temperature {classifier.temperature:g}. Inputs are read "
            "with fewshot-med's reader (Pillow and MONAI readers, its intensity handling and antialiased "
            "resize), which must be installed; the network is TorchScript, traced on the CPU."
        ),
        "authors": "fewshot-med export",
        "copyright": "see the model card and the licence of the data the classifier was fitted on",
        "intended_use": (
            "Research and decision support under clinical supervision, on images like those it was fitted "
            "on. Not a medical device."
        ),
        "limitations": (
            f"Knows only the classes {', '.join(names)}: any other image still gets one of them. "
            + (
                f"The registered classifier abstains when the top probability is below {threshold:g}; "
                f"{PREDICTIONS_FILE} marks those rows abstain=True."
                if threshold is not None
                else "The registered classifier never abstains on a readable image."
            )
        ),
        "data_type": "PNG, JPEG, BMP, TIFF, DICOM or NIfTI (one slice) files",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "RGB" if channels == 3 else "magnitude",
                    "num_channels": channels,
                    "spatial_shape": [size, size],
                    "dtype": "float32",
                    "value_range": [0, 255],
                    "is_patch_data": False,
                    "channel_def": channel_def,
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(names),
                    "spatial_shape": [len(names)],
                    "dtype": "float64",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {str(index): name for index, name in enumerate(names)},
                }
            },
        },
        "fewshot_med": {
            "source": source,
            "method": classifier.method.name,
            "backbone": classifier.spec.to_dict(),
            "temperature": classifier.temperature,
            "abstain_below": threshold,
            "preprocessing": preprocessing.to_dict(),
            "reader": "fewshot_med.deploy.preprocess.load_inputs (needs fewshot-med installed)",
        },
        **({"model_card": json.loads(json.dumps(dict(card), default=str))} if card is not None else {}),
    }


def _version(distribution: str) -> str:
    """The installed version of a distribution, without a local build label."""
    return metadata.version(distribution).split("+")[0]


def inference_config(classifier: FewShotClassifier, batch_size: int = BUNDLE_BATCH_SIZE) -> dict[str, Any]:
    """``configs/inference.json``: list the image files of ``dataset_dir`` (recursively, by suffix),
    read each with ``read_item`` (MONAI ``Dataset``/``DataLoader``, ``Lambda``), run ``model.ts`` through
    a ``SimpleInferer`` on the CPU and write ``output_dir/predictions.csv`` (``write_predictions``)."""
    preprocessing = classifier.preprocessing
    assert preprocessing is not None  # trace_network refused it otherwise
    module = "fewshot_med_bundle"
    return {
        "imports": ["$import torch", f"$import {__name__} as {module}"],
        "bundle_root": ".",
        "dataset_dir": "images",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cpu')",
        "batch_size": batch_size,
        "class_names": list(classifier.class_names),
        "abstain_below": classifier.abstain_below,
        "fewshot_med_preprocessing": preprocessing.to_dict(),
        "network_def": f"$torch.jit.load(@bundle_root + '/{MODEL_FILE}', map_location=@device)",
        "network": "$@network_def.eval()",
        "datalist": f"${module}.list_images(@dataset_dir)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "Lambda",
                    "func": f"$lambda item: {module}.read_item(item, @fewshot_med_preprocessing)",
                }
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": "@batch_size",
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "initialize": ["$torch.set_grad_enabled(False)"],
        "run": [
            f"${module}.write_predictions("
            "[(batch['path'], batch['error'], @inferer(batch['image'].to(@device), @network)) "
            "for batch in @dataloader], @class_names, @abstain_below, @output_dir)"
        ],
    }


def list_images(dataset_dir: str) -> list[dict[str, str]]:
    """The image files of a folder (recursive, by suffix, sorted, as ``fewshot-med predict`` lists a
    folder), as ``[{"path": file}, …]``.

    Raises:
        DataError: ``dataset_dir`` is not a folder, or holds no image files.
    """
    if not Path(dataset_dir).is_dir():
        raise DataError(f"dataset_dir {dataset_dir}: not a folder; pass --dataset_dir FOLDER_OF_IMAGES")
    return [{"path": shown} for shown, _ in expand_inputs([dataset_dir])]


def read_item(item: Mapping[str, str], preprocessing: Mapping[str, Any]) -> dict[str, Any]:
    """Read ``item["path"]`` exactly as the registered classifier does (``load_inputs``).

    Args:
        item: ``{"path": file}``.
        preprocessing: ``Preprocessing.to_dict()``.

    Returns:
        ``path``; ``image``, ``(C, S, S)`` float32 pixels in 0..255 (NaN for a file that cannot be
        read, whose probabilities are then NaN); ``error``, ``""`` or why the file could not be read
        (also logged as a warning).
    """
    settings = Preprocessing.from_dict(preprocessing)
    images, errors = load_inputs([item["path"]], settings)
    size, channels = settings.image_size, settings.channels
    if errors[0] is not None:
        _logger.warning(errors[0])
        image = torch.full((channels, size, size), float("nan"))
    else:
        image = torch.from_numpy(images[0]).permute(2, 0, 1).float()
    return {"path": item["path"], "image": image, "error": errors[0] or ""}


def write_predictions(
    batches: Iterable[tuple[Sequence[str], Sequence[str], torch.Tensor]],
    class_names: Sequence[str],
    abstain_below: float | None,
    output_dir: str,
) -> Path:
    """Write ``output_dir/predictions.csv`` with the columns of ``fewshot-med predict``: ``path``, one
    probability per class, ``prediction``, ``confidence``, ``abstain``, ``error``.

    Args:
        batches: per batch, the files, their read errors (``""`` if none) and ``(B, n_classes)``
            probabilities.
        class_names: the probability columns, in the network's output order.
        abstain_below: ``abstain`` when the top probability is below this; ``None``: only unreadable
            files abstain.
        output_dir: created if missing.

    Returns:
        The CSV file.
    """
    import pandas as pd

    paths, errors, probs = [], [], []
    for batch_paths, batch_errors, batch_probs in batches:
        paths += list(batch_paths)
        errors += list(batch_errors)
        probs.append(batch_probs.detach().cpu().double().numpy())
    probabilities = np.concatenate(probs) if probs else np.zeros((0, len(class_names)))
    readable = np.asarray([not error for error in errors], dtype=bool)
    confidence = np.where(readable, np.nan_to_num(probabilities, nan=0.0).max(axis=1, initial=0.0), np.nan)
    best = np.nan_to_num(probabilities, nan=0.0).argmax(axis=1) if len(paths) else np.zeros(0, dtype=int)
    table = pd.DataFrame({"path": paths})
    for index, name in enumerate(class_names):
        table[name] = probabilities[:, index]
    table["prediction"] = np.where(readable, np.asarray(class_names, dtype=object)[best], "")
    table["confidence"] = confidence
    abstain = ~readable
    if abstain_below is not None:
        abstain |= readable & (np.nan_to_num(confidence, nan=0.0) < abstain_below)
    table["abstain"] = abstain
    table["error"] = errors
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / PREDICTIONS_FILE, index=False)
    return folder / PREDICTIONS_FILE


def bundle_readme(meta: Mapping[str, Any]) -> str:
    """``docs/README.md``: what the bundle classifies, what it needs installed, how to run it and what
    it writes."""
    outputs = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    image = meta["network_data_format"]["inputs"]["image"]
    packages = ", ".join(f"{name}=={version}" for name, version in meta["required_packages_version"].items())
    card = meta.get("model_card")
    lines = [
        f"# {meta['name']}",
        "",
        meta["task"] + ".",
        "",
        meta["description"],
        "",
        "## Install",
        "",
        f"monai=={meta['monai_version']}, torch=={meta['pytorch_version']}, {packages}. Files are read "
        "with fewshot-med's reader (exactly as the registered classifier reads them: Pillow and MONAI "
        "readers, its intensity handling, antialiased bilinear resize), so fewshot-med must be installed.",
        "",
        "## Run",
        "",
        "From this folder:",
        "",
        "```",
        "python -m monai.bundle run --config_file configs/inference.json \\",
        "    --dataset_dir FOLDER_OF_IMAGES --output_dir OUTPUT_FOLDER",
        "```",
        "",
        "From elsewhere, add `--bundle_root BUNDLE_FOLDER` and give `--config_file` and "
        "`--meta_file BUNDLE_FOLDER/configs/metadata.json` with the folder. The network runs on the CPU "
        "(it was traced there).",
        "",
        "## Output",
        "",
        f"`OUTPUT_FOLDER/{PREDICTIONS_FILE}`: one row per image file of the folder (searched recursively), "
        "with the columns `path`, one calibrated probability per class, `prediction`, `confidence`, "
        "`abstain` and `error`, as `fewshot-med predict` writes. A file that cannot be read gets NaN "
        "probabilities, `abstain` true and the reason in `error`.",
        "",
        "Classes (output channels): "
        + ", ".join(f"{index}: {name}" for index, name in outputs.items())
        + ".",
        "",
        f"Network input: `(B, {image['num_channels']}, {image['spatial_shape'][0]}, "
        f"{image['spatial_shape'][1]})` float32 pixels in 0..255 (`models/model.ts`), output `(B, "
        f"{len(outputs)})` float64 probabilities.",
        "",
        "## Intended use and limits",
        "",
        meta["intended_use"],
        "",
        meta["limitations"],
    ]
    if card is not None:
        lines += ["", "The model card is in `configs/metadata.json` under `model_card`."]
    return "\n".join(lines) + "\n"
