"""The robustness suite: white-box attacks on adapted few-shot models (written to ``docs/robustness.md``).

Per dataset (HAM10000 and PBC, the guide's protocol), the pipeline's own backbone (trained here or
reused with ``--from``) and the pipeline's saved test episodes. For every frozen-feature inductive
method of the dataset's config (``fewshot_med.robustness.adapted.ATTACKABLE``; searched
hyperparameters chosen on val episodes as the evaluate stage does) and every K, on the first
``SETTINGS.episodes`` test episodes:

1. clean against attacked accuracy and pooled ECE, 95% CIs over episodes: FGSM and PGD-L∞ with 10 and
   50 steps (random start) at ε ∈ {1, 2, 4, 8}/255, gradients through backbone and fitted head, with
   the Adversarial Robustness Toolbox (``fewshot_med.robustness.attacks``);
2. the support-set attack: PGD on one support image to flip a correctly classified query, for the
   methods whose fit is differentiable (class means, R2-D2's closed form);
3. the gradient-masking check: accuracy at ε = 32/255 near 0, PGD-50 never above PGD-10.

Then the sections of the other robustness studies on the same opened dataset (``SECTIONS``): data
poisoning (``poisoning``) on both, adversarial querying (``robust_training``) on PBC.

The suite attacks single-view models (``evaluation.test_time_views=identity``): a config's dihedral
views put 8 backbone passes into every attack step, 8 times the cost, and the full run would take
hours on 2 CPU cores. Clean rows are therefore those of the single-view model, not the pipeline's.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.common import OpenedDataset, SuiteOptions, SuiteReport, open_dataset
from benchmarks.suites import poisoning, robust_training
from fewshot_med import tracking
from fewshot_med.pipelines.robustness import robustness_metrics, robustness_study
from fewshot_med.robustness.evaluate import RobustnessSettings, epsilon_label
from fewshot_med.robustness.report import RobustnessReport
from fewshot_med.tracking import names

REPO = Path(__file__).resolve().parents[2]
#: Dataset name -> the pipeline config whose backbone, episodes and methods the suite attacks.
DATASETS = {"ham10000": REPO / "configs/ham10000.yaml", "pbc": REPO / "configs/pbc.yaml"}
SUITE = "robustness"
#: The full run: 10 episodes per K, one query per class (at equal cost, more episodes narrow an
#: interval over episodes more than more queries per episode), 3 support-attack targets per episode.
#: Each method, K and episode costs 258 PGD/FGSM steps on 3 images plus 120 single-image steps of the
#: support attack; a backward pass of ResNet-10t takes about 9 ms per image at 64 px (HAM10000) and
#: 3.6 ms at 28 px (PBC) on 2 CPU cores: the 12 (method, K) pairs took 10.2 and 6.3 minutes
#: (docs/robustness.md).
SETTINGS = RobustnessSettings(episodes=10, queries_per_class=1, support_targets=3)
#: A smoke run: numbers mean nothing.
QUICK_SETTINGS = RobustnessSettings(steps=(2, 4), episodes=2, queries_per_class=1, support_targets=1)
QUICK_OVERRIDES = (
    "pretrain.epochs=1",
    "pretrain.steps_per_epoch=4",
    "pretrain.warmup_epochs=0",
    "meta_train.enabled=false",
    "methods=[{name: protonet}, {name: logreg}, {name: bd_cspn}]",
    "episodes.shots=[5]",  # K >= 2: the poisoning section's support flips need two images per class
    "episodes.n_test_episodes=4",
    "episodes.n_val_episodes=4",
)
#: Every config's test-time views in this suite: one (see the module docstring).
VIEWS_OVERRIDE = "evaluation.test_time_views=identity"
#: Per dataset, the other studies of the suite, each ``section(opened, options) -> (markdown, metrics)``.
#: Robust training trains three backbones: 7.7 minutes at 28 px (PBC), an estimated half hour at 64 px,
#: so it runs on PBC only to keep the full suite within an hour.
SECTIONS = {"ham10000": (poisoning.section,), "pbc": (robust_training.section, poisoning.section)}


def run(options: SuiteOptions) -> SuiteReport:
    """The robustness suite on every dataset of ``DATASETS``."""
    if options.threads:
        torch.set_num_threads(options.threads)
    settings = QUICK_SETTINGS if options.quick else SETTINGS
    report = SuiteReport(markdown=_preamble(settings, options.quick))
    for name, path in DATASETS.items():
        with open_dataset(SUITE, name, path, options, QUICK_OVERRIDES, overrides=(VIEWS_OVERRIDE,)) as opened:
            markdown, metrics, attacks = _dataset(opened, options, settings)
            tracking.log_text_artifact(markdown, names.suite_artifact(SUITE, "md"))
            tracking.log_text_artifact(attacks.csv(), names.suite_artifact(SUITE, "csv"))
            tracking.log_metrics(metrics)
        report.markdown += "\n" + names.dataset_block(name, markdown) + "\n"
        report.metrics.update(metrics)
        report.record.update(opened.lineage.record())
        report.tables[names.dataset_artifact(SUITE, name, "csv")] = attacks.csv()
    return report


def _dataset(
    opened: OpenedDataset, options: SuiteOptions, settings: RobustnessSettings
) -> tuple[str, dict[str, float], RobustnessReport]:
    """One dataset: the attack tables, then every other section's markdown; their metrics."""
    start = time.perf_counter()
    attacks = robustness_study(opened.context, opened.embedded, opened.episodes, settings)
    seconds = time.perf_counter() - start
    lineage = opened.lineage
    markdown = (
        f"### {lineage.name}\n\nBackbone {lineage.backbone_source}; test episodes {lineage.episode_source}; "
        f"the first {settings.episodes} per K, {settings.queries_per_class} query per class attacked; "
        f"attacks took {seconds / 60:.1f} min.\n\n{attacks.markdown()}"
    )
    metrics = {
        names.metric_key(lineage.name, key): value for key, value in robustness_metrics(attacks).items()
    }
    for section in SECTIONS[lineage.name]:  # their metrics already name the dataset
        text, extra = section(opened, options)
        markdown += "\n" + text.strip() + "\n"
        metrics.update(extra)
    return markdown, metrics, attacks


def _preamble(settings: RobustnessSettings, quick: bool) -> str:
    budgets = ", ".join(epsilon_label(e) for e in settings.epsilons)
    steps = " and ".join(map(str, settings.steps))
    smoke = "\n\n*Quick run: a smoke test whose numbers mean nothing.*" if quick else ""
    return (
        "## Adversarial robustness of adapted few-shot models\n\n"
        f"White-box FGSM and PGD-L∞ ({steps} steps, random start) at ε ∈ {{{budgets}}} on images in "
        "[0, 1] before normalisation, through backbone and fitted head (ART); the support-set attack "
        "perturbs one support image; the check attacks at "
        f"{epsilon_label(settings.check_epsilon)}. A query counts as robust only when it is classified "
        "correctly clean and attacked. Every model takes one view per image: the configs' dihedral "
        "test-time views would make each attack step 8 times as costly, so clean rows are those of the "
        f"single-view model.{smoke}\n"
    )
