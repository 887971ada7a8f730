"""A generated dermatology-like demo dataset: deterministic from a seed, no download.

Every image is a patch of skin (tone, shading and noise vary per patient and image) with one lesion
at a random position, size, elongation and rotation. A class is a combination of procedural
features: border irregularity (angular harmonics), a ring or a central spot, a texture (radial
streaks, dots or scaly high-frequency noise) and the lesion and accent colours. Every rare class
shares features with a common one, and per-image jitter makes the classes overlap, so the task is
neither trivial nor solvable by a linear model on raw pixels.
"""

from __future__ import annotations

import numpy as np

from fewshot_med.data.dataset import SPLITS, MedicalImageDataset, Split
from fewshot_med.data.splits import assign_splits
from fewshot_med.errors import DataError

DEMO_BASE_CLASSES: tuple[str, ...] = ("naevus", "keratosis", "melanoma", "carcinoma", "psoriasis")
DEMO_NOVEL_CLASSES: tuple[str, ...] = ("dermatofibroma", "vascular", "actinic")
DEMO_CLASS_NAMES: tuple[str, ...] = DEMO_BASE_CLASSES + DEMO_NOVEL_CLASSES

# Mean appearance per class, jittered per patient and image: colours of the lesion body and of its
# accent features; size: radius / half the image side; elong: axis ratio; irreg: amplitude of the
# border harmonics; soft: border blur; ring, spot, streaks, dots, scales: weight of each accent
# feature. Rare classes borrow: dermatofibroma ~ naevus with a pale centre, vascular ~ naevus
# shape in psoriasis red with dots, actinic ~ keratosis scales on carcinoma pink.
# fmt: off
_CLASS_TABLE: dict[str, tuple[str | float, ...]] = {
    #                  body       accent     size  elong irreg soft  ring spot strk dots scales
    "naevus":         ("#73472e", "#472b1c", 0.30, 1.15, 0.04, 0.06, 0.0, 0.1, 0.0, 0.3, 0.0),
    "keratosis":      ("#946647", "#4c3829", 0.38, 1.30, 0.10, 0.04, 0.0, 0.0, 0.0, 0.2, 0.8),
    "melanoma":       ("#4c2e24", "#5c617a", 0.40, 1.30, 0.26, 0.08, 0.0, 0.2, 0.7, 0.2, 0.0),
    "carcinoma":      ("#d1948c", "#8c4040", 0.33, 1.15, 0.06, 0.06, 0.7, 0.6, 0.3, 0.0, 0.0),
    "psoriasis":      ("#bf5952", "#ebe6e0", 0.45, 1.60, 0.15, 0.10, 0.0, 0.0, 0.0, 0.0, 0.9),
    "dermatofibroma": ("#855440", "#e0ccbf", 0.27, 1.15, 0.05, 0.12, 0.2, 0.8, 0.0, 0.2, 0.0),
    "vascular":       ("#9e3842", "#591a2e", 0.28, 1.15, 0.04, 0.04, 0.0, 0.0, 0.0, 0.8, 0.0),
    "actinic":        ("#b87361", "#e6d9c7", 0.36, 1.40, 0.14, 0.15, 0.0, 0.0, 0.0, 0.1, 0.7),
}
# fmt: on

SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
MIN_IMAGE_SIZE = 16
MIN_IMAGES_PER_CLASS = 40
CHUNK = 256  # images rendered at once; bounds memory at large image sizes
HARMONICS = np.arange(2, 7, dtype=np.float32)  # angular frequencies of the lesion border
MAX_HAIRS = 3
LIGHT_SKIN = np.array([0.93, 0.80, 0.70], dtype=np.float32)
DARK_SKIN = np.array([0.55, 0.38, 0.28], dtype=np.float32)
HAIR = np.array([0.12, 0.09, 0.07], dtype=np.float32)
REDNESS = np.array([0.04, -0.02, -0.01], dtype=np.float32)  # colour jitter keeps a plausible hue


def make_demo_dataset(
    seed: int = 0,
    image_size: int = 32,
    images_per_common_class: int = 500,
    images_per_rare_class: int = 150,
) -> MedicalImageDataset:
    """Generate the demo dataset of 5 common and 3 rare synthetic skin-lesion classes.

    Each synthetic patient has 1 to 3 images of one class, and splits are assigned with
    ``assign_splits(labels, groups, (0.7, 0.1, 0.2), seed)``, so no patient is in two splits.

    Args:
        seed: seeds ``np.random.default_rng``; the same seed gives byte-identical arrays.
        image_size: side ``S`` of the square images, at least 16.
        images_per_common_class: images of each of ``DEMO_BASE_CLASSES``, at least 40.
        images_per_rare_class: images of each of ``DEMO_NOVEL_CLASSES``, at least 40.

    Returns:
        A dataset named ``"demo"`` with ``class_names=DEMO_CLASS_NAMES``; every split holds
        ``(N, S, S, 3)`` uint8 images, ``(N,)`` int64 labels and ``(N,)`` string patient ids.
    """
    _check_count("image_size", image_size, MIN_IMAGE_SIZE)
    _check_count("images_per_common_class", images_per_common_class, MIN_IMAGES_PER_CLASS)
    _check_count("images_per_rare_class", images_per_rare_class, MIN_IMAGES_PER_CLASS)
    rng = np.random.default_rng(seed)
    counts = [images_per_common_class] * len(DEMO_BASE_CLASSES)
    counts += [images_per_rare_class] * len(DEMO_NOVEL_CLASSES)
    labels, patients = _patients(rng, counts)
    order = rng.permutation(labels.shape[0])
    labels, patients = labels[order], patients[order]
    params = _image_params(rng, labels, patients)
    images = render_in_chunks(rng, params, image_size)
    groups = np.asarray([f"demo-patient-{patient:05d}" for patient in patients])
    split_of = assign_splits(labels, groups, SPLIT_FRACTIONS, seed)
    splits = {}
    for name in SPLITS:
        chosen = split_of == name
        splits[name] = Split(images=images[chosen], labels=labels[chosen], groups=groups[chosen])
    source = (
        f"generated:demo?seed={seed}&image_size={image_size}"
        f"&images_per_common_class={images_per_common_class}"
        f"&images_per_rare_class={images_per_rare_class}"
    )
    return MedicalImageDataset(
        name="demo",
        class_names=DEMO_CLASS_NAMES,
        splits=splits,
        source=source,
    )


def _check_count(argument: str, value: int, minimum: int) -> None:
    """Raise ``DataError`` unless ``value`` is an integer of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(
            f"make_demo_dataset: {argument}={value!r} is invalid; pass an integer >= {minimum}",
        )


def _patients(rng: np.random.Generator, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Cut each class's images into patients of 1 to 3 images.

    Returns:
        ``(N,)`` int64 labels and ``(N,)`` patient indices, class by class.
    """
    labels, patients = [], []
    next_patient = 0
    for label, count in enumerate(counts):
        sizes = rng.integers(1, 4, size=count)  # more patients than needed; cut at ``count`` images
        n_patients = int(np.searchsorted(np.cumsum(sizes), count)) + 1
        ids = np.arange(next_patient, next_patient + n_patients)
        patients.append(np.repeat(ids, sizes[:n_patients])[:count])
        labels.append(np.full(count, label, dtype=np.int64))
        next_patient += n_patients
    return np.concatenate(labels), np.concatenate(patients)


def _rgb(hex_colour: str) -> list[float]:
    """``"#rrggbb"`` as three floats in [0, 1]."""
    return [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]


def _image_params(
    rng: np.random.Generator, labels: np.ndarray, patients: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-image appearance parameters: the class means, jittered per patient and per image.

    Args:
        rng: the dataset's generator.
        labels: ``(N,)`` class indices into ``DEMO_CLASS_NAMES``.
        patients: ``(N,)`` patient indices; a patient's images share skin tone and lesion colour.

    Returns:
        Arrays with first axis ``N``: ``skin``, ``colour`` and ``accent`` ``(N, 3)``; ``amplitude``
        and ``phase`` ``(N, len(HARMONICS))``; ``hair_*`` ``(N, MAX_HAIRS)``; ``centre`` and
        ``dot_phase`` ``(N, 2)``; all others ``(N,)``.
    """
    rows = [_CLASS_TABLE[name] for name in DEMO_CLASS_NAMES]
    table = np.array([[*_rgb(body), *_rgb(accent), *rest] for body, accent, *rest in rows])
    table = table.astype(np.float32)[labels]
    n = labels.shape[0]
    n_patients = int(patients.max()) + 1

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal((n, *shape), dtype=np.float32)

    def uniform(low: float, high: float, *shape: int) -> np.ndarray:
        return rng.uniform(low, high, size=(n, *shape)).astype(np.float32)

    tone = rng.beta(1.6, 1.6, size=n_patients).astype(np.float32)[patients, None]
    skin = (LIGHT_SKIN + (DARK_SKIN - LIGHT_SKIN) * tone) * np.exp(0.05 * normal(1))
    skin += REDNESS * uniform(-0.5, 1.5, 1)
    # brightness and redness jitter of the lesion, shared by a patient's images; lesions also look
    # darker on darker skin
    per_patient = rng.standard_normal((n_patients, 2), dtype=np.float32)[patients]
    jitter = 0.7 * per_patient + 0.7 * normal(2)
    darkening = 0.75 + 0.25 * skin.mean(axis=1, keepdims=True) / LIGHT_SKIN.mean()
    colour = table[:, 0:3] * darkening * np.exp(0.12 * jitter[:, :1]) + REDNESS * jitter[:, 1:]
    accent = table[:, 3:6] * np.exp(0.1 * normal(1)) + REDNESS * normal(1)
    size, elongation, irregularity, softness = table[:, 6:10].T
    ring, spot, streaks, dots, scales = np.clip(table[:, 10:15] + 0.15 * normal(5), 0, 1).T
    n_harmonics = len(HARMONICS)
    n_hairs = np.where(rng.random(n) < 0.25, rng.integers(1, MAX_HAIRS + 1, size=n), 0)
    return {
        "skin": skin,
        "colour": colour,
        "accent": accent,
        "opacity": uniform(0.7, 1.0),
        "centre": uniform(-0.45, 0.45, 2),
        "angle": uniform(0, np.pi),
        "size": size * np.exp(0.22 * normal()),
        "elongation": 1 + (elongation - 1) * np.exp(0.4 * normal()),
        "amplitude": irregularity[:, None] * np.exp(0.4 * normal(n_harmonics)) / np.sqrt(HARMONICS),
        "phase": uniform(0, 2 * np.pi, n_harmonics),
        "softness": softness * np.exp(0.3 * normal()),
        "ring": ring,
        "spot": spot,
        "streaks": streaks,
        "dots": dots,
        "scales": scales,
        "n_streaks": rng.integers(7, 14, size=n).astype(np.float32),
        "streak_phase": uniform(0, 2 * np.pi),
        "dot_frequency": uniform(8, 12),
        "dot_phase": uniform(0, 2 * np.pi, 2),
        "shading": uniform(0, 0.12),
        "shading_angle": uniform(0, 2 * np.pi),
        "hair_on": (np.arange(MAX_HAIRS) < n_hairs[:, None]).astype(np.float32),
        "hair_angle": uniform(0, np.pi, MAX_HAIRS),
        "hair_offset": uniform(-0.9, 0.9, MAX_HAIRS),
        "hair_curve": uniform(-0.15, 0.15, MAX_HAIRS),
        "blur": uniform(0, 1),
        "contrast": uniform(0.8, 1.2),
        "brightness": uniform(-0.05, 0.05),
        "noise": uniform(0.01, 0.04),
    }


def render_in_chunks(rng: np.random.Generator, params: dict[str, np.ndarray], size: int) -> np.ndarray:
    """``(N, size, size, 3)`` uint8 images of ``_image_params``, ``CHUNK`` at a time (bounded memory)."""
    n = len(next(iter(params.values())))
    chunks = [{key: value[i : i + CHUNK] for key, value in params.items()} for i in range(0, n, CHUNK)]
    return np.concatenate([_render(rng, chunk, size) for chunk in chunks])


def _render(rng: np.random.Generator, params: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Draw images from rows of ``_image_params``; returns ``(n, size, size, 3)`` uint8."""
    # every parameter as (n, ..., 1, 1) to broadcast over (n, ..., size, size) pixels; colours as
    # (n, 1, 1, 3) to broadcast over (n, size, size, 3) images
    p = {key: value[..., None, None] for key, value in params.items()}
    skin, colour, accent = (params[key][:, None, None] for key in ("skin", "colour", "accent"))
    n = p["size"].shape[0]
    grid = (np.arange(size, dtype=np.float32) + 0.5) * (2 / size) - 1
    xx, yy = grid[None, :], grid[:, None]

    # lesion coordinates: centred, rotated, scaled to unit radius and elongated
    dx, dy = xx - p["centre"][:, 0], yy - p["centre"][:, 1]
    cos, sin = np.cos(p["angle"]), np.sin(p["angle"])
    stretch = np.sqrt(p["elongation"])
    lx = (cos * dx + sin * dy) / (p["size"] * stretch)
    ly = (cos * dy - sin * dx) * stretch / p["size"]
    theta = np.arctan2(ly, lx)
    harmonics = np.cos(HARMONICS[:, None, None] * theta[:, None] + p["phase"])
    r = np.hypot(lx, ly) / (1 + np.einsum("nk,nkhw->nhw", params["amplitude"], harmonics))
    pixel = 2 / (size * p["size"])  # one pixel in lesion units: keeps edges anti-aliased
    mask = _sigmoid((1 - r) / (p["softness"] + pixel)) * p["opacity"]

    # accent-coloured features inside the lesion, each weighted per image
    ring = p["ring"] * np.exp(-(((r - 0.8) / 0.15) ** 2))
    spot = p["spot"] * np.exp(-((r / 0.4) ** 2))
    rays = (0.5 + 0.5 * np.cos(p["n_streaks"] * theta + p["streak_phase"])) ** 3
    streaks = p["streaks"] * np.clip(r, 0, 1) * rays
    lattice = np.cos(p["dot_frequency"] * lx + p["dot_phase"][:, 0])
    lattice += np.cos(p["dot_frequency"] * ly + p["dot_phase"][:, 1])
    dots = p["dots"] * _sigmoid(6 * (lattice - 1.2))
    scales = p["scales"] * 1.5 * rng.random((n, size, size), dtype=np.float32) ** 2
    weight = np.clip(ring + spot + streaks + dots + scales, 0, 1)[..., None]
    lesion = colour + (accent - colour) * weight

    shading = 1 + p["shading"] * (np.cos(p["shading_angle"]) * xx + np.sin(p["shading_angle"]) * yy)
    background = skin * shading[..., None]
    image = background + (lesion - background) * mask[..., None]

    # hairs: thin, slightly curved dark lines
    across = np.cos(p["hair_angle"]) * xx + np.sin(p["hair_angle"]) * yy
    along = np.cos(p["hair_angle"]) * yy - np.sin(p["hair_angle"]) * xx
    distance = across - p["hair_offset"] - p["hair_curve"] * along**2
    hair = (p["hair_on"] * np.exp(-((distance * size / 1.2) ** 2))).max(axis=1)[..., None]
    image += (HAIR - image) * 0.85 * hair

    # acquisition: blur, contrast and brightness jitter, sensor noise
    image += (_blur(image) - image) * p["blur"][..., None]
    mean = image.mean(axis=(1, 2, 3), keepdims=True)
    image = mean + (image - mean) * p["contrast"][..., None] + p["brightness"][..., None]
    image += p["noise"][..., None] * rng.standard_normal(image.shape, dtype=np.float32)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, without overflow."""
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _blur(images: np.ndarray) -> np.ndarray:
    """Separable ``[1, 2, 1] / 4`` blur of ``(n, H, W, C)`` images, edges replicated."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows = (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4
    return (rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]) / 4
