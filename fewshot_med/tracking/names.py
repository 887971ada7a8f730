"""The naming contract: every MLflow metric key, tag, param and artifact path the toolkit writes.

Writers build each name with a function or constant of this module. Readers never parse a name
back: they build the names they expect from what they already know about a run (its Ks, method
labels and calibrators, read from the `shots`/`method` tags and the `calibration` param) and look
them up. `run_names` enumerates what one run of a pipeline tree may hold, `is_defined` checks a name
against it. Imports nothing heavy (no mlflow).

`<K>shot` is `shot(k)` (`5shot`); `<method>` a method label; `<calibration>` a calibrator name
(`val_temperature`, `loo_temperature`; absent when uncalibrated); `<metric>` a summary metric of the
evaluation, each also as `<metric>_ci95` (`ci95`: the 95% CI half-width).

| Metric key | Run | Builder |
|---|---|---|
| `test.<K>shot.<method>[.<calibration>].<metric>` | pipeline | `test_metric` |
| `test.<K>shot[.<calibration>].<metric>` | `method:<label>` | `test_metric` (method `None`) |
| `generalised.<K>shot[.<method>].<metric>` | pipeline / `method:<label>` | `generalised_metric` |
| `val.<K>shot[.<method>].<metric>` (val episodes, raw) | pipeline / `method:<label>` | `val_metric` |
| `calibration.<K>shot.<calibrator>.<param>` | `method:<label>` | `calibration_metric` |
| `pretrain.<field>`, `meta_train.<field>` (curves, `best_*`) | `pretrain`, `meta_train` | `stage_metric` |
| `swag.rank`, `swag.n_snapshots` | `pretrain` | `SWAG_RANK`, `SWAG_SNAPSHOTS` |
| `time.<stage>_seconds` | pipeline | `time_metric` |
| `select.<K>shot.<criterion>.<field>`, `select.<K>shot.best_accuracy` | `select` | `select_metric` |
| `<dataset>.<K>shot.<...>` | benchmark runs | `benchmark_metric` |
| `<dataset>.<...>` (not per K: a training arm's seconds) | benchmark runs | `benchmark_value` |
| `<suite>.wall_seconds` | benchmark suite run | `suite_wall_metric` |
| `adapt.cv[.calibrated].<metric>[_ci95]`, `adapt.cv.recall.<class>[_ci95]` | `adapt` | `adapt_metric` |
| `adapt.<field>` (`temperature`, `threshold`, ...), `time.<step>_seconds` | `adapt` | `adapt_value` |
| `audit.<check>`, `audit.<severity>`, `audit.items`, `audit.seconds` | `audit` | `audit_metric` |
| `robust.<K>shot.…`, `support_attack.…`, `masking_check.…` | `robustness` | `robust_metric` |

| Tag | Run |
|---|---|
| `stage` (one of `STAGES`, or `method:<label>`) | every stage and method run |
| `method`, `shots` (`1,5`: `list_value`) | `method:<label>` (`method` also on `register`) |
| `seed`, `backbone`, `data.source`, `stages`; `from_run`, `suite`, `reproduces` when given | pipeline |
| `git_commit`, `git_dirty`, `version.<package>` | pipeline, benchmark suite run |
| `data.digest`, `data.name` | pipeline, and runs that log a dataset input |
| `backbone` / `algorithm` | `pretrain` / `meta_train` |
| `k_shot`, `registered_model`, `registered_version`, `holds_<alias>` | `register` |
| `error` | any run that failed |
| `suite`, `quick`, `command`, `env.<key>`, `record.<key>` | benchmark suite run |
| `mlflow.experimentKind` = `custom_model_development` | every experiment the toolkit opens |
| `selection_score`, `score_name` (`val_metric`; `adapt.cv.accuracy`) | registered model versions |
| `stage`=`adapt`, `method`, `data.digest`, `from_run`/`from_model`, `registered_*`, `holds_*` | `adapt` |
| `stage`=`audit`, `data.digest`, `data.name`, `data.source`, `audit.features`, `from_run` | `audit` |

Params: the pipeline run holds the flattened config (`episodes.shots`, ...) and, for a method with a
`search`, `search.<K>shot.<method>.<param>` (`search_param`; without the method on `method:<label>`),
the value its val episodes chose. A stage run holds its
section, without the section prefix: `pretrain`, `meta_train`, `selection` (on `select`), and on
`evaluate` the `evaluation` section (`calibration` as a `list_value`) plus `episodes.*`. The `adapt`
run (top level, `fewshot-med adapt`) holds `adapt.<setting>` (`adapt_param`: the salted data token,
folds, choice rule, targets, the chosen method's `adapt.params.<name>`, `adapt.preprocessing.*`).
The `audit` run (top level, `fewshot-med audit`) holds its thresholds and Ks as params (`shots`,
`phash_distance`, `feature_cosine`, …: `AuditReport.settings`).

| Artifact path | Run | Builder |
|---|---|---|
| `config.yaml` | pipeline | `CONFIG` |
| `reproduce.csv`, `reproduce.md` | pipeline of `fewshot-med reproduce` | `REPRODUCE_CSV`, `REPRODUCE_MD` |
| `results.md`, `results.csv` | pipeline, `evaluate` | `RESULTS_MD`, `RESULTS_CSV` |
| `results.json` | `evaluate` | `RESULTS_JSON` |
| `plots/accuracy_vs_shots.png`, `plots/risk_coverage_<K>shot.png` | pipeline | `plot_path(s)` |
| `plots/{reliability,confusion,generalised_confusion}_<K>shot.png` | `method:<label>` | `plot_path(s)` |
| `per_episode/test_<K>shot[_<calibration>].csv` | `method:<label>` | `per_episode_path` |
| `search/<K>shot.csv` | `method:<label>` with a `search` | `search_path` |
| `episodes/{test,val}_<K>shot.json` | `evaluate`; `select` and benchmark runs: test | `episodes_path` |
| `backbone_spec.json` | `pretrain`, `meta_train` | `BACKBONE_SPEC` |
| `swag/posterior.pt` | `pretrain` | `SWAG_POSTERIOR` |
| `model_card.md` | `register` | `MODEL_CARD` |
| `selection/<K>shot.md`, `selection/<K>shot_scores.csv` | `select` | `selection_*_path` |
| `<suite>.md`, `<suite>.csv`; `peers.json` (the verdicts) | benchmark runs | `suite_artifact` |
| `<kind>_<dataset>[_<K>shot].<ext>` | benchmark suite run | `dataset_artifact` |
| `adapt/candidates.csv`, `adapt/oof_predictions.csv` | `adapt` | `ADAPT_CANDIDATES`, `ADAPT_PREDICTIONS` |
| `model_card.{md,json}`, `plots/{confusion,reliability,risk_coverage}.png` | `adapt` | `plot_path` |
| `audit/report.md`, `audit/report.html`, `audit/flagged.csv` (paths as tokens) | `audit` | `AUDIT_*` |

Logged models (MLflow 3 logged models, not run artifacts): `backbone` on `pretrain` and `meta_train`
(model tag `backbone`), `classifier` on `register` and `adapt`; both keep the backbone spec in their `MLmodel`
metadata under `SPEC_METADATA_KEY`. A classifier also keeps its preprocessing, abstention threshold and
model card there (`PREPROCESSING_METADATA_KEY`, `ABSTAIN_METADATA_KEY`, `CARD_METADATA_KEY`) and, when
given a card, holds `model_card.json` and `model_card.md` among its own artifacts (`MODEL_CARD_JSON`,
`MODEL_CARD`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# --- runs ----------------------------------------------------------------------------------------
PRETRAIN = "pretrain"
META_TRAIN = "meta_train"
EVALUATE = "evaluate"
REGISTER = "register"
SELECT = "select"
#: Stage runs nested in a pipeline run, in pipeline order (``stage`` tag and run name).
STAGES = (PRETRAIN, META_TRAIN, EVALUATE, REGISTER, SELECT)
#: The label the oracle's results are reported under.
ORACLE = "oracle"
#: ``calibration`` of uncalibrated results.
UNCALIBRATED = "none"
_METHOD_STAGE = "method:"
#: The top-level run of ``fewshot-med adapt``: its run name, ``stage`` tag and default experiment.
ADAPT = "adapt"
#: Its steps, each timed as ``time_metric(step)``.
ADAPT_STEPS = ("load", "cross_validate", "refit", "register")


def method_stage(label: str) -> str:
    """The ``stage`` tag (and run name) of a method's run nested in ``evaluate``: ``method:<label>``."""
    return _METHOD_STAGE + label


# --- tags ----------------------------------------------------------------------------------------
STAGE_TAG = "stage"
METHOD_TAG = "method"
SHOTS_TAG = "shots"
SEED_TAG = "seed"
BACKBONE_TAG = "backbone"
DATA_SOURCE_TAG = "data.source"
DATA_DIGEST_TAG = "data.digest"
DATA_NAME_TAG = "data.name"
STAGES_TAG = "stages"
FROM_RUN_TAG = "from_run"
#: The pipeline run that ``fewshot-med reproduce`` re-ran, on the reproduction's pipeline run.
REPRODUCES_TAG = "reproduces"
#: The model URI an ``adapt`` run started from (``models:/NAME@ALIAS``), when not a run.
FROM_MODEL_TAG = "from_model"
GIT_COMMIT_TAG = "git_commit"
GIT_DIRTY_TAG = "git_dirty"
ERROR_TAG = "error"
#: pipeline and evaluate runs: the methods whose evaluation raised (their runs FAILED, reason in ``error``)
FAILED_METHODS_TAG = "failed_methods"
ALGORITHM_TAG = "algorithm"
#: training stages run by torchrun: processes in the group and the torch.distributed backend (nccl, gloo)
WORLD_SIZE_TAG = "distributed.world_size"
DIST_BACKEND_TAG = "distributed.backend"
K_SHOT_TAG = "k_shot"
REGISTERED_MODEL_TAG = "registered_model"
REGISTERED_VERSION_TAG = "registered_version"
SUITE_TAG = "suite"
QUICK_TAG = "quick"
COMMAND_TAG = "command"
#: Who runs a run: host name, process id and that process's start (so a reused pid is not taken for
#: the owner); a later command on the same host ends the run KILLED once its owner is gone.
OWNER_HOST_TAG = "owner.host"
OWNER_PID_TAG = "owner.pid"
OWNER_START_TAG = "owner.process_start"
#: Why a run was ended by another command than its own (its owner died without closing it).
ORPHANED_TAG = "orphaned"
#: On a resumed run (stage and pipeline run): the id of the interrupted run it continues; the stage
#: run also holds the interrupted run's metric history up to the checkpoint.
RESUMED_FROM_TAG = "resumed_from"
#: Tags any run of the toolkit may carry, whatever its stage: its owner and its life across processes.
LIFECYCLE_TAGS = frozenset({OWNER_HOST_TAG, OWNER_PID_TAG, OWNER_START_TAG, ORPHANED_TAG, RESUMED_FROM_TAG})
#: Tags of a registered model version: its selection score and what the score is (``val_metric``).
SCORE_TAG = "selection_score"
SCORE_NAME_TAG = "score_name"
#: MLflow's own tags the readers follow (written by MLflow, never by the toolkit).
PARENT_RUN_TAG = "mlflow.parentRunId"
#: MLflow's experiment tag for the kind of work it holds; ``custom_model_development`` makes the UI
#: open the experiment on its runs, not on the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Tags of a dataset input (``mlflow.data``): the split and the classes used.
INPUT_SPLIT_TAG = "split"
INPUT_CLASSES_TAG = "classes"
#: Key of the ``BackboneSpec`` in a logged model's ``MLmodel`` metadata.
SPEC_METADATA_KEY = "fewshot_med_backbone_spec"
#: Keys of a logged classifier's ``MLmodel`` metadata: its ``Preprocessing`` (``to_dict``; ``None``:
#: uint8 arrays only), its abstention threshold and its model card.
PREPROCESSING_METADATA_KEY = "fewshot_med_preprocessing"
ABSTAIN_METADATA_KEY = "fewshot_med_abstain_below"
CARD_METADATA_KEY = "fewshot_med_model_card"
_VERSION_PREFIX = "version."
_ENV_PREFIX = "env."
_RECORD_PREFIX = "record."
_HOLDS_PREFIX = "holds_"


def version_tag(package: str) -> str:
    """``version.<package>`` with ``-`` as ``_`` (``version.fewshot_med``)."""
    return _VERSION_PREFIX + package.replace("-", "_")


def holds_alias_tag(alias: str) -> str:
    """``holds_<alias>``: whether the register stage's new version holds the alias (``true``/``false``)."""
    return _HOLDS_PREFIX + alias


def env_tag(key: str) -> str:
    """``env.<key>``: the machine a benchmark suite ran on."""
    return _ENV_PREFIX + key


def record_tag(key: str) -> str:
    """``record.<key>``: what a benchmark suite's numbers depend on (see ``record_key``)."""
    return _RECORD_PREFIX + key


def list_value(values: Iterable[object]) -> str:
    """A list as one tag or param value: ``1,5`` (the ``shots`` tag, the ``calibration`` param)."""
    return ",".join(str(value) for value in values)


def list_items(value: str | None) -> list[str]:
    """The items of a ``list_value`` (none for ``None`` or ``""``)."""
    return value.split(",") if value else []


def dataset_input_name(dataset: str, split: str) -> str:
    """The MLflow dataset name of one split: ``<dataset>.<split>``."""
    return f"{dataset}.{split}"


# --- params --------------------------------------------------------------------------------------
#: Param of the ``evaluate`` run listing its calibrators (``list_value``).
CALIBRATION_PARAM = "calibration"
#: The config section each stage run logs as params (``evaluate`` adds ``episodes.*``).
STAGE_PARAM_SECTIONS = {
    PRETRAIN: "pretrain",
    META_TRAIN: "meta_train",
    EVALUATE: "evaluation",
    SELECT: "selection",
}
EPISODES_SECTION = "episodes"

# --- metrics -------------------------------------------------------------------------------------
SWAG_RANK = "swag.rank"
SWAG_SNAPSHOTS = "swag.n_snapshots"
_CI95 = "_ci95"
_MLFLOW_UNSAFE = re.compile(r"[^/\w.\- ]")


def metric_key(*parts: object) -> str:
    """Parts joined by dots, characters MLflow refuses in a metric key as ``_``."""
    return _MLFLOW_UNSAFE.sub("_", ".".join(str(part) for part in parts))


def shot(k: int) -> str:
    """``<K>shot``, the K part of every per-K name."""
    return f"{k}shot"


def ci95(metric: str) -> str:
    """The name of a metric's 95% CI half-width: ``<metric>_ci95``."""
    return metric + _CI95


def test_metric(k: int, method: str | None, calibration: str, metric: str) -> str:
    """``test.<K>shot[.<method>][.<calibration>].<metric>``; ``method`` ``None`` on the method's own run,
    ``calibration`` ``UNCALIBRATED`` for raw results."""
    optional = [part for part in (method, calibration) if part not in (None, UNCALIBRATED)]
    return metric_key("test", shot(k), *optional, metric)


def generalised_metric(k: int, method: str | None, metric: str) -> str:
    """``generalised.<K>shot[.<method>].<metric>`` (base + novel classes)."""
    return metric_key("generalised", shot(k), *([method] if method is not None else []), metric)


def calibration_metric(k: int, calibrator: str, param: str) -> str:
    """``calibration.<K>shot.<calibrator>.<param>``: a fitted calibrator parameter."""
    return calibration_prefix(k, calibrator) + metric_key(param)


def calibration_prefix(k: int, calibrator: str) -> str:
    """``calibration.<K>shot.<calibrator>.``: what every parameter of one calibrator fit starts with."""
    return metric_key("calibration", shot(k), calibrator) + "."


def stage_metric(stage: str, field: str) -> str:
    """``<stage>.<field>``: a training stage's curves and summaries (``pretrain.best_epoch``)."""
    return metric_key(stage, field)


def time_metric(stage: str) -> str:
    """``time.<stage>_seconds``: a stage's wall time, on the pipeline run."""
    return metric_key("time", f"{stage}_seconds")


def select_metric(k: int, criterion: str | None, field: str) -> str:
    """``select.<K>shot[.<criterion>].<field>`` of the selection study."""
    return metric_key(SELECT, shot(k), *([criterion] if criterion is not None else []), field)


def val_metric(k: int, metric: str, method: str | None = None) -> str:
    """``val.<K>shot[.<method>].<metric>``: a val-episode score of the method evaluated at test ``K``
    (the registry's ``score_name``; ``method`` ``None`` on the method's own run)."""
    return metric_key("val", shot(k), *([method] if method is not None else []), metric)


def search_param(k: int, param: str, method: str | None = None) -> str:
    """``search.<K>shot[.<method>].<param>``: the value the val episodes chose for a searched
    hyperparameter (``method`` ``None`` on the method's own run)."""
    return metric_key("search", shot(k), *([method] if method is not None else []), param)


def adapt_metric(metric: str, calibrated: bool = False) -> str:
    """``adapt.cv[.calibrated].<metric>``: a cross-validated metric of the ``adapt`` run's chosen model,
    out of fold, before (or after) temperature scaling."""
    return metric_key(ADAPT, "cv", *(["calibrated"] if calibrated else []), metric)


def recall_metric(class_name: str) -> str:
    """``recall.<class>``: one class's recall, as the ``metric`` of ``adapt_metric``."""
    return metric_key("recall", class_name)


def adapt_value(field: str) -> str:
    """``adapt.<field>``: a number of the ``adapt`` run (``temperature``, ``threshold``, ...)."""
    return metric_key(ADAPT, field)


def adapt_param(*parts: str) -> str:
    """``adapt.<parts…>``: a setting of the ``adapt`` run (``adapt.folds``, ``adapt.params.lam``)."""
    return ".".join([ADAPT, *parts])


def benchmark_metric(dataset: str, k: int, *parts: str) -> str:
    """``<dataset>.<K>shot.<parts…>``: a benchmark suite's headline number for one dataset and K."""
    return metric_key(dataset, shot(k), *parts)


def benchmark_value(dataset: str, *parts: str) -> str:
    """``<dataset>.<parts…>``: a benchmark suite's headline number for one dataset, not per K (e.g.
    ``pbc.robust_training.natural.train_seconds``)."""
    return metric_key(dataset, *parts)


#: The poisoning study's part of a benchmark key, and its three attacks.
POISONING = "poisoning"
SUPPORT_FLIPS = "support_flips"
BASE_FLIPS = "base_flips"
FEATURE_COLLISION = "feature_collision"


def poisoning_metric(dataset: str, attack: str, *parts: object) -> str:
    """``<dataset>.poisoning.<attack>.<parts…>``: a headline number of the poisoning study (``attack``
    one of ``SUPPORT_FLIPS``, ``BASE_FLIPS``, ``FEATURE_COLLISION``; parts such as ``shot(5)``,
    ``rate0.2``, the method or detector, the field)."""
    return metric_key(dataset, POISONING, attack, *parts)


def record_key(dataset: str, *parts: str) -> str:
    """``<dataset>.<parts…>``: one entry of a benchmark suite's record (tagged ``record.<key>``)."""
    return ".".join([dataset, *parts])


def suite_wall_metric(suite: str) -> str:
    """``<suite>.wall_seconds``: a benchmark suite's wall time."""
    return metric_key(suite, "wall_seconds")


# --- artifacts -----------------------------------------------------------------------------------
CONFIG = "config.yaml"
#: ``fewshot-med reproduce``'s comparison of every metric with the reproduced run's.
REPRODUCE_CSV = "reproduce.csv"
REPRODUCE_MD = "reproduce.md"
RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
BACKBONE_SPEC = "backbone_spec.json"
SWAG_POSTERIOR = "swag/posterior.pt"
MODEL_CARD = "model_card.md"
#: The model card as JSON, beside ``MODEL_CARD`` among a logged classifier's artifacts.
MODEL_CARD_JSON = "model_card.json"
#: The ``adapt`` run's candidates with their cross-validated scores, and its out-of-fold predictions.
ADAPT_CANDIDATES = "adapt/candidates.csv"
ADAPT_PREDICTIONS = "adapt/oof_predictions.csv"
PLOTS_DIR = "plots"
#: Names of the logged models.
BACKBONE_MODEL = "backbone"
CLASSIFIER_MODEL = "classifier"

ACCURACY_VS_SHOTS = "accuracy_vs_shots"
RISK_COVERAGE = "risk_coverage"
RELIABILITY = "reliability"
CONFUSION = "confusion"
GENERALISED_CONFUSION = "generalised_confusion"
#: Plots on the pipeline run (across methods) and on each method's run, in report order.
PIPELINE_PLOTS = (ACCURACY_VS_SHOTS, RISK_COVERAGE)
METHOD_PLOTS = (RELIABILITY, CONFUSION, GENERALISED_CONFUSION)
_PLOTS_WITHOUT_K = frozenset({ACCURACY_VS_SHOTS})


def plot_path(kind: str, k: int | None = None) -> str:
    """``plots/<kind>[_<K>shot].png``."""
    return f"{PLOTS_DIR}/{kind}{'' if k is None else '_' + shot(k)}.png"


def plot_paths(kinds: Sequence[str], shots: Sequence[int]) -> list[tuple[str, int | None, str]]:
    """``(kind, K, path)`` of every plot of ``kinds`` at ``shots``, kind by kind then by K (``K`` is
    ``None`` for a plot over all Ks)."""
    return [
        (kind, k, plot_path(kind, k))
        for kind in kinds
        for k in ([None] if kind in _PLOTS_WITHOUT_K else sorted(shots))
    ]


def episodes_path(split: str, k: int) -> str:
    """``episodes/<split>_<K>shot.json``: a saved episode list (``EpisodeList.to_dict``)."""
    return f"episodes/{split}_{shot(k)}.json"


def per_episode_path(k: int, calibration: str) -> str:
    """``per_episode/test_<K>shot[_<calibration>].csv``: one method's per-episode test metrics."""
    suffix = "" if calibration == UNCALIBRATED else "_" + calibration
    return f"per_episode/test_{shot(k)}{suffix}.csv"


def search_path(k: int) -> str:
    """``search/<K>shot.csv``: every combination of a method's searched hyperparameters with its mean
    val-episode accuracy at K."""
    return f"search/{shot(k)}.csv"


def selection_table_path(k: int) -> str:
    """``selection/<K>shot.md``: the selection study at K."""
    return f"selection/{shot(k)}.md"


def selection_scores_path(k: int) -> str:
    """``selection/<K>shot_scores.csv``: every candidate's criterion scores per episode at K."""
    return f"selection/{shot(k)}_scores.csv"


def suite_artifact(suite: str, extension: str) -> str:
    """``<suite>.<extension>``: a benchmark's section (``peers.md``), table (``peers.csv``) or verdicts
    (``peers.json``)."""
    return f"{suite}.{extension}"


def dataset_block(dataset: str, markdown: str) -> str:
    """A benchmark section's block for one dataset, between ``<!-- dataset:<name> -->`` markers."""
    return f"<!-- dataset:{dataset} -->\n{markdown.strip()}\n<!-- /dataset:{dataset} -->"


def dataset_artifact(kind: str, dataset: str, extension: str, k: int | None = None) -> str:
    """``<kind>_<dataset>[_<K>shot].<extension>``: a benchmark suite's per-dataset table or figure."""
    return f"{kind}_{dataset}{'' if k is None else '_' + shot(k)}.{extension}"


# --- adversarial evaluation (``fewshot-med robustness``, the robustness suite) -------------------
#: The stage run of ``fewshot-med robustness`` (nested in its pipeline run) and the suite's name.
ROBUSTNESS = "robustness"
#: Its tables: markdown and one CSV row per method, K and attack.
ROBUSTNESS_MD = "robustness/results.md"
ROBUSTNESS_CSV = "robustness/results.csv"


def robust_metric(k: int, method: str, attack: str, metric: str) -> str:
    """``robust.<K>shot.<method>.<attack>.<metric>``: accuracy or pooled ECE (``ece_pooled``) of the
    adapted method under one attack (``clean``, ``pgd10_eps8``, ``fgsm_eps2``, ...)."""
    return metric_key("robust", shot(k), method, attack, metric)


def support_attack_metric(k: int, method: str, epsilon: str, metric: str) -> str:
    """``support_attack.<K>shot.<method>.eps<ε·255>.<metric>``: the one-support-image attack's success
    rate."""
    return metric_key("support_attack", shot(k), method, f"eps{epsilon}", metric)


def masking_check_metric(k: int, method: str) -> str:
    """``masking_check.<K>shot.<method>``: 1 when the gradient-masking sanity check passed, else 0."""
    return metric_key("masking_check", shot(k), method)


# --- data audit (``fewshot-med audit``) -----------------------------------------------------------
#: The top-level run of ``fewshot-med audit``: its run name, ``stage`` tag and experiment.
AUDIT = "audit"
#: Its report, rendered report and flagged rows, with every data path as its token unless --log-paths.
AUDIT_REPORT_MD = "audit/report.md"
AUDIT_REPORT_HTML = "audit/report.html"
AUDIT_FLAGGED_CSV = "audit/flagged.csv"
#: Tag: how the audit represented the images (a backbone's features, or the cheap representation).
AUDIT_FEATURES_TAG = "audit.features"


def audit_metric(field: str) -> str:
    """``audit.<field>``: findings per check (``audit.label_conflict``) or severity (``audit.error``),
    images listed (``audit.items``), wall time (``audit.seconds``)."""
    return metric_key(AUDIT, field)


# --- the contract as a check ---------------------------------------------------------------------
@dataclass(frozen=True)
class Vocabulary:
    """What the names of one pipeline tree are built from.

    Attributes:
        shots: the Ks evaluated.
        methods: the method labels (the oracle's included when it ran).
        calibrations: the configured calibrators.
        metrics: the summary metrics of the few-shot results (``EpisodeResults.summary``).
        generalised_metrics: those of the generalised results.
        criteria: the selection criteria.
        alias: the registry alias the register stage moves.
        config_paths: the dotted paths of the flattened config (the pipeline run's param keys).
    """

    shots: tuple[int, ...]
    methods: tuple[str, ...]
    calibrations: tuple[str, ...]
    metrics: tuple[str, ...]
    generalised_metrics: tuple[str, ...]
    criteria: tuple[str, ...] = ()
    alias: str = "champion"
    config_paths: frozenset[str] = frozenset()


@dataclass(frozen=True)
class NameSet:
    """Names given in full, plus families whose last part is open, given by their common prefix."""

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.exact or name.startswith(self.prefixes))


@dataclass(frozen=True)
class RunNames:
    """Every name one run may hold, by kind."""

    metrics: NameSet
    tags: NameSet
    params: NameSet
    artifacts: NameSet


_DATA_TAGS = (DATA_DIGEST_TAG, DATA_NAME_TAG)
_PIPELINE_TAGS = (
    SEED_TAG, BACKBONE_TAG, DATA_SOURCE_TAG, STAGES_TAG, FROM_RUN_TAG, SUITE_TAG, REPRODUCES_TAG, *_DATA_TAGS
)  # fmt: skip
_STAGE_TAGS = {
    PRETRAIN: (BACKBONE_TAG, *_DATA_TAGS),
    META_TRAIN: (ALGORITHM_TAG, *_DATA_TAGS),
    EVALUATE: (*_DATA_TAGS, FAILED_METHODS_TAG),
    REGISTER: (METHOD_TAG, K_SHOT_TAG, REGISTERED_MODEL_TAG, REGISTERED_VERSION_TAG),
    SELECT: _DATA_TAGS,
}


def run_names(stage: str | None, vocabulary: Vocabulary) -> RunNames:
    """The names the toolkit may write on one run of a pipeline tree.

    Args:
        stage: the run's ``stage`` tag: one of ``STAGES``, ``method_stage(label)``, ``ADAPT``, or
            ``None`` for the pipeline run itself.
        vocabulary: the Ks, labels and calibrators of the tree.

    Returns:
        Its metric keys, tags (MLflow's own ``mlflow.*`` and ``LIFECYCLE_TAGS`` excepted), params and
        artifact paths.
    """
    if stage is None:
        return _pipeline_names(vocabulary)
    if stage == ADAPT:
        return _adapt_names(vocabulary)
    if stage == ROBUSTNESS:
        return _robustness_names()
    if stage in STAGES:
        return _stage_names(stage, vocabulary)
    return _method_names(vocabulary)


def is_defined(kind: str, name: str, stage: str | None, vocabulary: Vocabulary) -> bool:
    """Whether the contract defines ``name`` as a ``metric``, ``tag``, ``param`` or ``artifact`` of a
    run whose ``stage`` tag is ``stage`` (``None``: the pipeline run); see ``run_names``."""
    if kind == "tag" and name in LIFECYCLE_TAGS:
        return True
    names = run_names(stage, vocabulary)
    found = {"metric": names.metrics, "tag": names.tags, "param": names.params, "artifact": names.artifacts}
    return name in found[kind]


def _pipeline_names(vocabulary: Vocabulary) -> RunNames:
    summaries = {key for method in vocabulary.methods for key in _summaries(vocabulary, method)}
    return RunNames(
        metrics=NameSet(frozenset({*summaries, *(time_metric(stage) for stage in STAGES)})),
        tags=NameSet(
            frozenset({*_PIPELINE_TAGS, GIT_COMMIT_TAG, GIT_DIRTY_TAG, ERROR_TAG, FAILED_METHODS_TAG}),
            (_VERSION_PREFIX,),
        ),
        params=NameSet(vocabulary.config_paths, _search_prefixes(vocabulary, vocabulary.methods)),
        artifacts=NameSet(
            frozenset(
                {CONFIG, RESULTS_MD, RESULTS_CSV, REPRODUCE_CSV, REPRODUCE_MD}
                | set(_plot_files(PIPELINE_PLOTS, vocabulary.shots))
            )
        ),
    )


def _method_names(vocabulary: Vocabulary) -> RunNames:
    shots, calibrations = vocabulary.shots, vocabulary.calibrations
    fits = tuple(calibration_prefix(k, calibrator) for k in shots for calibrator in calibrations)
    tables = [per_episode_path(k, name) for k in shots for name in (UNCALIBRATED, *calibrations)]
    return RunNames(
        metrics=NameSet(frozenset(_summaries(vocabulary, None)), fits),
        tags=NameSet(frozenset({STAGE_TAG, METHOD_TAG, SHOTS_TAG, ERROR_TAG})),
        params=NameSet(prefixes=_search_prefixes(vocabulary, [None])),
        artifacts=NameSet(frozenset({*_plot_files(METHOD_PLOTS, shots), *tables, *map(search_path, shots)})),
    )


def _adapt_names(vocabulary: Vocabulary) -> RunNames:
    """The ``adapt`` run: its ``adapt.*`` metrics and params, step times, tags and artifacts."""
    tags = {STAGE_TAG, METHOD_TAG, DATA_DIGEST_TAG, FROM_RUN_TAG, FROM_MODEL_TAG, ERROR_TAG}
    tags |= {REGISTERED_MODEL_TAG, REGISTERED_VERSION_TAG, holds_alias_tag(vocabulary.alias)}
    tags |= {GIT_COMMIT_TAG, GIT_DIRTY_TAG}
    plots = (plot_path(kind) for kind in (CONFUSION, RELIABILITY, RISK_COVERAGE))
    return RunNames(
        metrics=NameSet(frozenset(time_metric(step) for step in ADAPT_STEPS), (ADAPT + ".",)),
        tags=NameSet(frozenset(tags), (_VERSION_PREFIX,)),
        params=NameSet(prefixes=(ADAPT + ".",)),
        artifacts=NameSet(
            frozenset({ADAPT_CANDIDATES, ADAPT_PREDICTIONS, MODEL_CARD, MODEL_CARD_JSON, *plots})
        ),
    )


def _robustness_names() -> RunNames:
    """The ``robustness`` stage run: its attack metrics, settings, episode lists and tables."""
    prefixes = ("robust.", "support_attack.", "masking_check.")
    return RunNames(
        metrics=NameSet(frozenset({time_metric(ROBUSTNESS)}), prefixes),
        tags=NameSet(frozenset({STAGE_TAG, ERROR_TAG, *_DATA_TAGS})),
        params=NameSet(prefixes=(ROBUSTNESS + ".",)),
        artifacts=NameSet(frozenset({ROBUSTNESS_MD, ROBUSTNESS_CSV}), ("episodes/",)),
    )


def _stage_names(stage: str, vocabulary: Vocabulary) -> RunNames:
    shots = vocabulary.shots
    tags = {STAGE_TAG, ERROR_TAG, *_STAGE_TAGS[stage]}
    metrics, artifacts = NameSet(), set()
    if stage == PRETRAIN:
        metrics = NameSet(frozenset({SWAG_RANK, SWAG_SNAPSHOTS}), (stage + ".",))
        artifacts = {BACKBONE_SPEC, SWAG_POSTERIOR}
    elif stage == META_TRAIN:
        metrics = NameSet(prefixes=(stage + ".",))
        artifacts = {BACKBONE_SPEC}
    elif stage == EVALUATE:
        episodes = [episodes_path(split, k) for split in ("test", "val") for k in shots]
        artifacts = {RESULTS_MD, RESULTS_CSV, RESULTS_JSON, *episodes}
    elif stage == REGISTER:
        tags.add(holds_alias_tag(vocabulary.alias))
        artifacts = {MODEL_CARD}
    elif stage == SELECT:
        criteria = [select_metric(k, criterion, "") for k in shots for criterion in vocabulary.criteria]
        metrics = NameSet(frozenset(select_metric(k, None, "best_accuracy") for k in shots), tuple(criteria))
        for k in shots:
            artifacts |= {episodes_path("test", k), selection_table_path(k), selection_scores_path(k)}
    return RunNames(
        metrics, NameSet(frozenset(tags)), _stage_params(stage, vocabulary), NameSet(frozenset(artifacts))
    )


def _summaries(vocabulary: Vocabulary, method: str | None) -> set[str]:
    """Every ``test_metric`` and ``generalised_metric`` key of one method (``None``: on its own run)."""
    keys = set()
    for k in vocabulary.shots:
        for metric in (*vocabulary.metrics, *map(ci95, vocabulary.metrics)):
            keys |= {
                test_metric(k, method, name, metric) for name in (UNCALIBRATED, *vocabulary.calibrations)
            }
        for metric in (*vocabulary.metrics, *map(ci95, vocabulary.metrics)):
            keys.add(val_metric(k, metric, method))
        for metric in (*vocabulary.generalised_metrics, *map(ci95, vocabulary.generalised_metrics)):
            keys.add(generalised_metric(k, method, metric))
    return keys


def _search_prefixes(vocabulary: Vocabulary, methods: Sequence[str | None]) -> tuple[str, ...]:
    """What every ``search_param`` of ``methods`` starts with (its last part is the method's own)."""
    return tuple(search_param(k, "", method) for k in vocabulary.shots for method in methods)


def _plot_files(kinds: Sequence[str], shots: Sequence[int]) -> list[str]:
    return [path for _, _, path in plot_paths(kinds, shots)]


def _stage_params(stage: str, vocabulary: Vocabulary) -> NameSet:
    """A stage's params: its config section's paths without the section, ``evaluate`` plus ``episodes.*``."""
    section = STAGE_PARAM_SECTIONS.get(stage)
    if section is None:
        return NameSet()
    paths = vocabulary.config_paths
    params = {path.removeprefix(section + ".") for path in paths if path.startswith(section + ".")}
    if stage == EVALUATE:
        params |= {path for path in paths if path.startswith(EPISODES_SECTION + ".")}
    return NameSet(frozenset(params))
