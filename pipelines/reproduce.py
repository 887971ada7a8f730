"""Reproduce a pipeline run from what MLflow holds: its config, seed, data digest and code commit.

``reproduce(run_id)`` reads the run's ``config.yaml``, checks the code commit and the data digest
before any work, re-runs the logged stages (or, ``from_backbone``, only the evaluation on the run's
own backbone) under a new pipeline run tagged ``reproduces=<run_id>``, and compares every metric of
the two runs. The comparison is logged on the new run as ``reproduce.csv`` and ``reproduce.md``.

Tolerance: 0 when the reproduction runs on the CPU. There every stage is bitwise reproducible from
the seed (the frozen-feature and closed-form methods on a reused backbone trivially; pretraining,
meta-training and fine-tuning measured on the tiny and quickstart pipelines, ``docs/evaluation.md``).
On CUDA or MPS, kernels such as cuDNN's convolution backward are not bitwise deterministic, so a
metric may move by at most the original run's own 95% CI half-width of that metric (a difference
that changes no conclusion the run supports), and a metric without an interval by
``RELATIVE_TOLERANCE`` of its value.
"""

from __future__ import annotations

import math
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fewshot_med import tracking
from fewshot_med.config import Config, TrackingConfig, load_config
from fewshot_med.errors import FewshotMedError
from fewshot_med.pipelines.evaluation import evaluate_stage
from fewshot_med.pipelines.stages import open_context
from fewshot_med.pipelines.transfer import backbone_stages
from fewshot_med.privacy import TOKEN_PREFIX
from fewshot_med.tracking import RunReview, names

#: Stages a reproduction re-runs, in order (``register`` and ``select`` never: a reproduction must not
#: move a registry alias, and the selection study is not part of the compared metrics).
REPRODUCED_STAGES = (names.PRETRAIN, names.META_TRAIN, names.EVALUATE)
#: Off the CPU, the tolerance of a metric without a 95% CI: this fraction of its original value.
RELATIVE_TOLERANCE = 0.05
#: Verdicts; the first two pass, ``new`` (only the reproduction has the metric) is reported only.
EQUAL, WITHIN, DIFFERS, MISSING, NEW = "equal", "within", "differs", "missing", "new"
_PASSING = frozenset({EQUAL, WITHIN, NEW})
_TOKEN = re.compile(rf"^{re.escape(TOKEN_PREFIX)}[0-9a-f]{{12}}$")
#: Config keys the reproduction sets itself: where the data, checkpoints and store are.
_DATA_KEY, _OUTPUT_KEY, _STORE_KEY = "data.source", "runtime.output_dir", "tracking.tracking_uri"


@dataclass(frozen=True)
class Row:
    """One metric of the two runs (``None``: the run has no such metric)."""

    metric: str
    original: float | None
    reproduced: float | None
    tolerance: float

    @property
    def difference(self) -> float | None:
        """``reproduced - original`` (0 when both are NaN; ``None`` when one is missing)."""
        if self.original is None or self.reproduced is None:
            return None
        if math.isnan(self.original) and math.isnan(self.reproduced):
            return 0.0
        return self.reproduced - self.original

    @property
    def verdict(self) -> str:
        """``equal`` (bitwise, or both NaN), ``within`` tolerance, ``differs``, ``missing`` from the
        reproduction, or ``new`` in it."""
        if self.original is None:
            return NEW
        difference = self.difference
        if difference is None:
            return MISSING
        if difference == 0.0:
            return EQUAL
        return WITHIN if abs(difference) <= self.tolerance else DIFFERS


@dataclass
class Reproduction:
    """What ``reproduce`` did: the new run, how (``full`` or ``from-backbone``, on which device), the
    metric rows in name order, the headline metrics (each method's uncalibrated test accuracy per K),
    and the warnings it printed (other commit, dirty checkout, package versions)."""

    original_run_id: str
    run_id: str | None
    mode: str
    device: str
    rows: list[Row]
    headline: frozenset[str] = frozenset()
    warnings: list[str] = field(default_factory=list)

    def shown_rows(self) -> list[Row]:
        """The rows a terminal shows: the headline metrics and every row that fails."""
        return [row for row in self.rows if row.metric in self.headline or row.verdict not in _PASSING]

    def failures(self) -> list[Row]:
        """Rows outside tolerance or missing from the reproduction."""
        return [row for row in self.rows if row.verdict not in _PASSING]

    def summary(self) -> str:
        """One line: how many metrics agree, or which differ."""
        counts = {verdict: sum(row.verdict == verdict for row in self.rows) for verdict in (EQUAL, WITHIN)}
        failures = self.failures()
        if not failures:
            return (
                f"reproduced run {self.original_run_id} ({self.mode}, {self.device}): all {len(self.rows)} "
                f"metrics agree, {counts[EQUAL]} equal and {counts[WITHIN]} within tolerance"
            )
        shown = ", ".join(
            f"{row.metric} {_number(row.original)} -> {_number(row.reproduced)}" for row in failures[:3]
        )
        more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
        return (
            f"run {self.original_run_id} did not reproduce ({self.mode}, {self.device}): {len(failures)} of "
            f"{len(self.rows)} metrics differ beyond tolerance or are missing: {shown}{more}"
        )


def reproduce(
    run_id: str,
    data: str | Path | None = None,
    from_backbone: bool = False,
    allow_other_commit: bool = False,
    tracking_uri: str | None = None,
    device: str | None = None,
) -> Reproduction:
    """Re-run a pipeline run from its logged config and seed, and compare every metric.

    Args:
        run_id: the pipeline run (or a run nested in it) whose evaluation to reproduce.
        data: the dataset the run used, required when it was a local file or folder (the store holds
            its path only as a token); its digest must equal the run's ``data.digest``.
        from_backbone: evaluate the run's own backbone instead of re-training it (the exact check of
            the frozen-feature methods).
        allow_other_commit: go on when the checkout's commit differs from the run's (else refused).
        tracking_uri: the store holding the run; the reproduction is logged there too.
        device: run on this device instead of the config's ``runtime.device``.

    Raises:
        FewshotMedError: unknown run, other commit, a path the store holds only as a token, or data
            whose digest differs; all before any training.
    """
    settings = TrackingConfig(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="fewshot-med-reproduce-") as folder:
        original = tracking.collect_run(run_id, Path(folder) / "original", settings, with_plots=False)
        if original.config_yaml is None:
            raise FewshotMedError(f"run {original.run_id} holds no {names.CONFIG}: it cannot be re-run")
        warnings = _check_commit(original, allow_other_commit)
        config = _config(original, data, Path(folder) / "outputs", tracking.tracking_uri(settings), device)
        stages, from_run = _plan(original, from_backbone)
        context = open_context(config)
        _check_digest(original, context.data.dataset.digest, data)
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
        exact = context.device.type == "cpu"
        tags = {names.STAGES_TAG: names.list_value(stages), names.REPRODUCES_TAG: original.run_id}
        if from_run:
            tags[names.FROM_RUN_TAG] = from_run
        with tracking.pipeline_run(config, run_name=config.name, tags=tags) as run:
            seconds: dict[str, float] = {}
            context = backbone_stages(context, stages, from_run, seconds=seconds)
            start = time.perf_counter()
            evaluate_stage(context)
            seconds[names.EVALUATE] = time.perf_counter() - start
            tracking.log_metrics({names.time_metric(stage): value for stage, value in seconds.items()})
            reproduced = tracking.collect_run(
                run.run_id, Path(folder) / "new", config.tracking, with_plots=False
            )
            retrained = names.PRETRAIN in stages or names.META_TRAIN in stages
            rows = compare(original, reproduced, exact, with_training=retrained)
            outcome = Reproduction(
                original.run_id,
                run.run_id,
                "from-backbone" if from_backbone else "full",
                str(context.device),
                rows,
                headline_metrics(original),
                warnings,
            )
            tracking.log_text_artifact(rows_csv(rows), names.REPRODUCE_CSV)
            tracking.log_text_artifact(
                rows_markdown(rows) + "\n\n" + outcome.summary() + "\n", names.REPRODUCE_MD
            )
    return outcome


def compare(original: RunReview, reproduced: RunReview, exact: bool, with_training: bool) -> list[Row]:
    """A row per metric of either run's pipeline run (wall times left out) and, ``with_training``, per
    training summary (``pretrain.best_epoch``, ...), in name order; tolerance 0 when ``exact``."""
    timings = {names.time_metric(stage) for stage in names.STAGES}
    before = {key: value for key, value in original.metrics.items() if key not in timings}
    after = {key: value for key, value in reproduced.metrics.items() if key not in timings}
    if with_training:
        before |= original.training
        after |= reproduced.training
    return [
        Row(key, before.get(key), after.get(key), 0.0 if exact else tolerance(key, before))
        for key in sorted(before.keys() | after.keys())
    ]


def tolerance(metric: str, original: Mapping[str, float]) -> float:
    """Off the CPU: the original run's 95% CI half-width of ``metric`` when it has one, else
    ``RELATIVE_TOLERANCE`` of the original value."""
    interval = original.get(names.ci95(metric))
    if interval is not None and math.isfinite(interval):
        return interval
    value = original.get(metric)
    return RELATIVE_TOLERANCE * abs(value) if value is not None and math.isfinite(value) else 0.0


def headline_metrics(review: RunReview) -> frozenset[str]:
    """Each method's uncalibrated test accuracy per K, as the pipeline run names them."""
    return frozenset(
        names.test_metric(k, method, names.UNCALIBRATED, "accuracy")
        for method in review.methods
        for k in review.shots
    )


def rows_csv(rows: Sequence[Row]) -> str:
    """The comparison as CSV, values at full precision (``repr``)."""
    lines = ["metric,original,reproduced,difference,tolerance,verdict"]
    for row in rows:
        values = (row.original, row.reproduced, row.difference, row.tolerance)
        lines.append(",".join([row.metric, *("" if v is None else repr(v) for v in values), row.verdict]))
    return "\n".join(lines) + "\n"


def rows_markdown(rows: Sequence[Row]) -> str:
    """The comparison as a markdown table."""
    lines = ["| metric | original | reproduced | difference | tolerance | verdict |", "|---" * 6 + "|"]
    for row in rows:
        cells = (row.original, row.reproduced, row.difference, row.tolerance)
        lines.append(f"| {row.metric} | " + " | ".join(map(_number, cells)) + f" | {row.verdict} |")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _check_commit(original: RunReview, allow_other_commit: bool) -> list[str]:
    """Refuse a checkout on another commit than the run's (unless ``allow_other_commit``); warnings
    for a dirty checkout on either side, an unrecorded commit, or other package versions."""
    here = tracking.version_tags()
    commit, now = original.git_commit or "unknown", here[names.GIT_COMMIT_TAG]
    warnings = []
    if "unknown" in (commit, now):
        warnings.append(f"code commit unknown (run: {commit}, checkout: {now}): the code may differ")
    elif commit != now:
        if not allow_other_commit:
            raise FewshotMedError(
                f"run {original.run_id} ran commit {commit[:12]} but the checkout is at {now[:12]}: check "
                f"out {commit[:12]} to reproduce it, or pass --allow-other-commit to compare across commits"
            )
        warnings.append(f"comparing across commits: run {commit[:12]}, checkout {now[:12]}")
    dirty = [
        side
        for side, flag in (("the run's", original.git_dirty), ("this", here.get(names.GIT_DIRTY_TAG)))
        if flag == "true"
    ]
    if dirty:
        warnings.append(f"{' and '.join(dirty)} checkout had uncommitted changes: the code may differ")
    versions = [
        f"{package} {version} -> {here[names.version_tag(package)]}"
        for package, version in original.versions.items()
        if here.get(names.version_tag(package), version) != version
    ]
    if versions:
        warnings.append(f"package versions differ: {', '.join(versions)}")
    return warnings


def _config(
    original: RunReview, data: str | Path | None, outputs: Path, store: str, device: str | None
) -> Config:
    """The run's logged config with the data at ``data`` (required when the store holds its path as a
    token), checkpoints under ``outputs`` (the original's stay untouched), the reproduction logged to
    ``store``, no model registration, and ``device`` if given."""
    logged = yaml.safe_load(original.config_yaml.read_text(encoding="utf-8"))
    source = logged["data"]["source"]
    if data is None and _TOKEN.match(str(source)):
        digest = (original.data_digest or "unrecorded")[:16]
        raise FewshotMedError(
            f"run {original.run_id} used a local dataset (logged as {source}, digest {digest}): pass "
            "--data PATH to the same file or folder"
        )
    overrides = {
        _DATA_KEY: str(Path(data).expanduser().resolve()) if data is not None else source,
        _OUTPUT_KEY: str(outputs),
        _STORE_KEY: store,
        "tracking.registered_model": None,
        **({"runtime.device": device} if device else {}),
    }
    tokens = [
        key
        for key, value in tracking.flatten_params(logged).items()
        if key not in overrides and _TOKEN.match(value)
    ]
    if tokens:
        raise FewshotMedError(
            f"run {original.run_id} logged {', '.join(tokens)} as a path token (tracking.log_paths was "
            "off), so its file is unknown: rerun it with `fewshot-med run` and the config that names it"
        )
    for key, value in overrides.items():
        section, name = key.split(".")
        logged.setdefault(section, {})[name] = value
    path = outputs.parent / names.CONFIG
    path.write_text(yaml.safe_dump(logged, sort_keys=False), encoding="utf-8")
    return load_config(path)


def _plan(original: RunReview, from_backbone: bool) -> tuple[tuple[str, ...], str | None]:
    """The stages to re-run and the run whose backbone they start from: the logged stages (of
    ``REPRODUCED_STAGES``) from the logged ``from_run``; or, ``from_backbone``, the evaluation alone on
    the backbone the run trained (or, if it trained none, the one it started from)."""
    logged = [stage for stage in names.list_items(original.stages) if stage in REPRODUCED_STAGES]
    trained = bool({names.PRETRAIN, names.META_TRAIN} & set(logged))
    if from_backbone:
        return (names.EVALUATE,), original.run_id if trained else original.from_run
    return tuple(logged), original.from_run


def _check_digest(original: RunReview, digest: str, data: str | Path | None) -> None:
    """Refuse data whose content digest is not the run's."""
    if original.data_digest is not None and digest != original.data_digest:
        where = f"--data {data}" if data is not None else "the dataset"
        raise FewshotMedError(
            f"{where} has digest {digest[:16]} but run {original.run_id} used {original.data_digest[:16]}: "
            "pass the data the run used"
        )
