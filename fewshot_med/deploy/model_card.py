"""The model card of a classifier adapted to a hospital's own images: what it is, what it was fitted and
measured on, when it abstains, and what it must not be used for.

The card follows the sections of Mitchell et al., "Model Cards for Model Reporting", FAT* 2019
(details, intended use, data, quantitative analysis with intervals, caveats). ``build_card`` returns a
JSON-able dict, logged with the model; ``card_markdown`` renders it for the model registry. A card holds
no file path, file name or patient id: only counts, the content digest and class names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fewshot_med.deploy.preprocess import Preprocessing
from fewshot_med.evaluation.cross_validation import CV_METRICS, Estimate
from fewshot_med.models.backbone import BackboneSpec

INTENDED_USE = (
    "Research and decision support under clinical supervision: a second reading that sorts images into "
    "the classes it was fitted on, at the site whose images it was fitted on, and says when it is unsure."
)
NOT_A_MEDICAL_DEVICE = (
    "Not a medical device: not certified or cleared for diagnosis; it must not be the sole basis of a "
    "clinical decision."
)
#: How each cross-validated metric reads in the card (``CV_METRICS`` order).
METRIC_LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_auroc": "macro AUROC (one-vs-rest)",
    "ece": "ECE (15 bins, top label)",
    "nll": "NLL (log-loss)",
    "brier": "Brier score",
}


def _estimate(estimate: Estimate) -> dict[str, float]:
    return {"value": estimate.value, "low": estimate.low, "high": estimate.high}


def build_card(
    *,
    name: str,
    class_names: Sequence[str],
    class_counts: Sequence[int],
    n_patients: int | None,
    data_digest: str,
    preprocessing: Preprocessing,
    method: str,
    params: Mapping[str, Any],
    temperature: float,
    backbone: BackboneSpec,
    backbone_source: str,
    base_mean_source: str,
    choice: Mapping[str, Any],
    metrics: Mapping[str, Estimate],
    calibrated: Mapping[str, Estimate],
    confusion: np.ndarray,
    abstention: Mapping[str, Any],
) -> dict[str, Any]:
    """The card as a JSON-able dict.

    Args:
        name: the registered model name.
        class_names: the classes, in logit order.
        class_counts: labelled images per class.
        n_patients: distinct patient ids, or ``None`` when the data gave none.
        data_digest: the content digest of the images, labels and groups (``MedicalImageDataset.digest``).
        preprocessing: how files become the classifier's input.
        method: the few-shot method's registry name.
        params: its hyperparameters as chosen.
        temperature: the temperature dividing its logits.
        backbone: the backbone's spec.
        backbone_source: where the backbone came from (a run id or a model URI).
        base_mean_source: where the mean feature that ``centred`` features subtract came from.
        choice: how the configuration was chosen: ``rule``, ``candidates``, ``scheme``, ``folds``,
            ``repeats``, ``seed``, ``n_boot``.
        metrics: ``cross_validation.cv_metrics`` of the uncalibrated out-of-fold predictions.
        calibrated: the same after temperature scaling (cross-fitted temperatures).
        confusion: ``(C, C)`` out-of-fold counts, true class in rows, summed over repeats.
        abstention: ``target`` (``coverage`` or ``accuracy``), ``target_value``, ``threshold`` (or
            ``None``), ``coverage`` and ``selective_accuracy`` on the out-of-fold predictions, ``reached``.
    """
    threshold = abstention["threshold"]
    limits = [
        NOT_A_MEDICAL_DEVICE,
        f"It only knows the classes {', '.join(class_names)}: an image of any other condition still gets "
        "one of them, often with high confidence.",
        "Measured by cross-validation on the same few images it was fitted on, at one site: expect lower "
        "accuracy on other scanners, protocols, sites and populations, and re-check on new local cases.",
        "The final model is refitted on every image, so it is usually a little more confident than the "
        "fold models the threshold and calibration were measured on.",
    ]
    if threshold is None:
        limits.append("It never abstains: every readable image gets a class.")
    else:
        limits.append(
            f"It abstains when its top calibrated probability is below {threshold:.3f}; abstained cases "
            "need a human reading."
        )
    if not abstention["reached"]:
        limits.append(
            f"No coverage reached the requested selective accuracy of {abstention['target_value']:.2f} "
            "out of fold, so it does not abstain."
        )
    return {
        "name": name,
        "intended_use": INTENDED_USE,
        "limitations": limits,
        "model": {
            "method": method,
            "params": dict(params),
            "temperature": temperature,
            "abstain_below": threshold,
            "backbone": backbone.name,
            "backbone_source": backbone_source,
            "base_feature_mean": base_mean_source,
        },
        "data": {
            "digest": data_digest,
            "images": int(sum(class_counts)),
            "patients": n_patients,
            "classes": {name: int(count) for name, count in zip(class_names, class_counts, strict=True)},
            "preprocessing": preprocessing.to_dict(),
        },
        "selection": dict(choice),
        "cross_validation": {
            "interval": (
                f"95% percentile bootstrap over {'patients' if n_patients else 'images'} "
                f"({choice['n_boot']} resamples), metrics averaged over repeats"
            ),
            "uncalibrated": {metric: _estimate(metrics[metric]) for metric in CV_METRICS},
            "calibrated": {metric: _estimate(calibrated[metric]) for metric in CV_METRICS},
            "recall": {name: _estimate(metrics[f"recall.{index}"]) for index, name in enumerate(class_names)},
            "confusion": {"classes": list(class_names), "counts": np.asarray(confusion).tolist()},
        },
        "abstention": dict(abstention),
    }


def _interval(estimate: Mapping[str, float]) -> str:
    return f"{estimate['value']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card of ``build_card`` as markdown (the registered version's description)."""
    model, data, cv = card["model"], card["data"], card["cross_validation"]
    choice, abstention = card["selection"], card["abstention"]
    params = ", ".join(f"{key}={value}" for key, value in model["params"].items()) or "defaults"
    threshold = model["abstain_below"]
    confusion = cv["confusion"]
    target = f"{abstention['target']} {abstention['target_value']:g}"
    sections = [
        f"# {card['name']}",
        f"**{NOT_A_MEDICAL_DEVICE}**",
        f"## Intended use\n\n{card['intended_use']}",
        "## Model\n\n"
        + _table(
            ("", ""),
            [
                ("method", f"`{model['method']}` ({params})"),
                ("temperature", f"{model['temperature']:.3f}"),
                ("abstains below", "never" if threshold is None else f"{threshold:.3f}"),
                ("backbone", f"`{model['backbone']}` from {model['backbone_source']}"),
                ("centring mean", model["base_feature_mean"]),
            ],
        ),
        "## Data\n\n"
        f"{data['images']} labelled images"
        + (f" of {data['patients']} patients" if data["patients"] else "")
        + f", content digest `{data['digest']}`.\n\n"
        + _table(("class", "images"), list(data["classes"].items())),
        "## Cross-validation\n\n"
        f"{choice['scheme']} folds: {choice['folds']} folds x {choice['repeats']} repeat(s), seed "
        f"{choice['seed']}; {choice['candidates']} candidate configuration(s), chosen by {choice['rule']}. "
        f"Value [95% CI]: {cv['interval']}. Calibrated: each fold's images scored with a temperature "
        "fitted on the other folds' out-of-fold logits.\n\n"
        + _table(
            ("metric", "uncalibrated", "calibrated"),
            [
                (METRIC_LABELS[m], _interval(cv["uncalibrated"][m]), _interval(cv["calibrated"][m]))
                for m in CV_METRICS
            ],
        )
        + "\n\nRecall per class:\n\n"
        + _table(("class", "recall"), [(name, _interval(value)) for name, value in cv["recall"].items()])
        + "\n\nConfusion matrix (out-of-fold, all repeats; rows true, columns predicted):\n\n"
        + _table(
            ("", *confusion["classes"]),
            [(name, *row) for name, row in zip(confusion["classes"], confusion["counts"], strict=True)],
        ),
        "## Abstention\n\n"
        f"Target {target}: on the out-of-fold predictions the threshold keeps "
        f"{abstention['coverage']:.1%} of the images at a selective accuracy of "
        f"{abstention['selective_accuracy']:.3f}"
        + ("." if threshold is None else f" (abstains below {threshold:.3f})."),
        "## Limitations\n\n" + "\n".join(f"- {limit}" for limit in card["limitations"]),
    ]
    return "\n\n".join(sections) + "\n"
