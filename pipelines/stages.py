"""The stages of the transfer pipeline, each one plain call whose output is the next one's input.

pretrain -> (meta-train) -> evaluate. Stages never reach back: each takes what it needs as arguments.
Tracking goes through ``fewshot_med.tracking`` (a no-op when tracking is disabled).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fewshot_med import tracking
from fewshot_med.config import Config, MethodConfig
from fewshot_med.data import (
    ClassRoles,
    ClassSubset,
    EpisodeList,
    MedicalImageDataset,
    sample_episodes,
    select_classes,
)
from fewshot_med.data.transforms import channel_stats, to_model_input
from fewshot_med.errors import FewshotMedError
from fewshot_med.evaluation import (
    EpisodeResults,
    evaluate_frozen,
    evaluate_generalised,
    evaluate_images,
    evaluate_oracle,
)
from fewshot_med.evaluation.report import markdown_table, summary_rows
from fewshot_med.methods import METHODS, MethodContext, create_method
from fewshot_med.models import BackboneSpec, create_backbone, embed
from fewshot_med.training.meta import meta_train
from fewshot_med.training.pretrain import pretrain


@dataclass(frozen=True)
class Data:
    """The dataset of a run with its class roles, as every stage sees it."""

    dataset: MedicalImageDataset
    roles: ClassRoles

    def subset(self, split: str, role: str) -> ClassSubset:
        """Images of the ``base`` or ``novel`` classes of one split."""
        return select_classes(self.dataset, split, self.roles.base if role == "base" else self.roles.novel)


def checkpoint_dir(config: Config) -> Path:
    """Where this config's checkpoints live: ``runtime.output_dir/<name>``."""
    return Path(config.runtime.output_dir) / config.name


def pretrain_stage(
    config: Config, data: Data, device: torch.device, resume: bool
) -> tuple[nn.Module, BackboneSpec]:
    """Build the backbone and train it on the base classes of the train split; log it as a model."""
    base_train, base_val = data.subset("train", "base"), data.subset("val", "base")
    mean, std = channel_stats(base_train.images)
    spec = BackboneSpec(config.model.backbone, 3, data.dataset.image_shape[0], mean, std)
    backbone = create_backbone(
        spec.name, spec.in_chans, spec.image_size, config.model.pretrained, config.model.weights
    )
    with tracking.stage_run("pretrain", tags={"backbone": spec.name}, params=config.pretrain.model_dump()):
        tracking.log_dataset_input(data.dataset, "training", "train", data.roles.base)
        tracking.log_dataset_input(data.dataset, "validation", "val", data.roles.base)
        if config.pretrain.enabled:
            result = pretrain(
                backbone,
                spec,
                base_train,
                base_val,
                config.pretrain,
                device,
                checkpoint_path=checkpoint_dir(config) / "pretrain.pt",
                resume=resume,
                log_metrics=tracking.log_metrics,
                seed=config.seed,
            )
            backbone = result.backbone
            best = {
                "best_val_balanced_accuracy": result.best_val_balanced_accuracy,
                "best_epoch": result.best_epoch,
            }
            tracking.log_metrics({f"pretrain.{key}": value for key, value in best.items()})
        tracking.log_dict_artifact(spec.to_dict(), "backbone_spec.json")
        tracking.log_backbone(backbone, spec)
    return backbone, spec


def meta_train_stage(
    config: Config, data: Data, backbone: nn.Module, spec: BackboneSpec, device: torch.device, resume: bool
) -> nn.Module:
    """Meta-train the backbone on base-class episodes (train split), validated on novel val episodes."""
    settings = config.meta_train
    with tracking.stage_run(
        "meta_train", tags={"algorithm": settings.algorithm}, params=settings.model_dump()
    ):
        tracking.log_dataset_input(data.dataset, "training", "train", data.roles.base)
        tracking.log_dataset_input(data.dataset, "validation", "val", data.roles.novel)
        result = meta_train(
            backbone,
            spec,
            data.subset("train", "base"),
            data.subset("val", "novel"),
            settings,
            device,
            checkpoint_path=checkpoint_dir(config) / f"meta_train_{settings.algorithm}.pt",
            resume=resume,
            log_metrics=tracking.log_metrics,
            seed=config.seed,
        )
        tracking.log_metrics(
            {
                "meta_train.best_val_accuracy": result.best_val_accuracy,
                "meta_train.best_episode": result.best_episode,
            }
        )
        tracking.log_dict_artifact(spec.to_dict(), "backbone_spec.json")
        tracking.log_backbone(result.backbone, spec)
    return result.backbone


def backbone_from_run(run_id: str, config: Config) -> tuple[nn.Module, BackboneSpec]:
    """The backbone an earlier run produced: its meta-trained one if any, else its pretrained one.

    ``run_id`` may be a pipeline run (its stage runs are searched) or a stage run itself.
    """
    for stage in ("meta_train", "pretrain"):
        child = tracking.find_stage_run(run_id, stage, config.tracking)
        if child is not None:
            return tracking.load_backbone(child, settings=config.tracking)
    try:
        return tracking.load_backbone(run_id, settings=config.tracking)
    except Exception as error:
        raise FewshotMedError(
            f"run {run_id} holds no backbone model ({type(error).__name__}); pass the id of a run "
            "that ran the pretrain or meta-train stage (see `fewshot-med ui`)"
        ) from None


@dataclass
class EvaluationReport:
    """Everything the evaluation stage measured."""

    few_shot: list[EpisodeResults]
    generalised: list[EpisodeResults]

    def table(self) -> str:
        """Markdown tables: few-shot results (then generalised ones, when present)."""
        text = markdown_table(self.few_shot)
        if self.generalised:
            metrics = ("base_accuracy", "novel_recall", "harmonic_mean")
            text += "\n\nGeneralised (base + novel classes):\n\n" + markdown_table(self.generalised, metrics)
        return text


def _per_episode_csv(result: EpisodeResults) -> str:
    """Per-episode metric values as CSV text."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["episode", *result.metrics[0]])
    writer.writeheader()
    for index, row in enumerate(result.metrics):
        writer.writerow({"episode": index, **row})
    return buffer.getvalue()


def _prefix(episodes: EpisodeList, method: MethodConfig) -> EpisodeList:
    """The first ``method.max_episodes`` episodes (the same tasks every method sees first)."""
    if method.max_episodes is None or method.max_episodes >= len(episodes):
        return episodes
    return EpisodeList(**{**episodes.__dict__, "episodes": episodes.episodes[: method.max_episodes]})


def evaluate_stage(
    config: Config, data: Data, backbone: nn.Module, spec: BackboneSpec, device: torch.device
) -> EvaluationReport:
    """Every configured method on the fixed test episodes of every K, plus the oracle and generalised rows.

    Frozen-feature methods use embeddings computed once per image; fine-tuning methods get images.
    Metrics go to MLflow as ``test.<K>shot.<method>.<metric>`` (and ``_ci95``) on the pipeline run and
    as ``test.<K>shot.<metric>`` on each method's nested run, so the compare view lines methods up.
    """
    subsets = {
        role_split: data.subset(role_split.split("_")[1], role_split.split("_")[0])
        for role_split in ("base_train", "base_test", "novel_train", "novel_test")
    }
    features = {
        name: embed(backbone, subset.images, spec, device, config.evaluation.batch_size)
        for name, subset in tqdm(subsets.items(), desc="embedding", leave=False, disable=None)
    }
    pool = subsets["novel_test"]
    context = MethodContext(
        base_feature_mean=features["base_train"].mean(dim=0),
        backbone=backbone,
        spec=spec,
        device=device,
        seed=config.seed,
    )
    protocol = config.episodes
    n_way = protocol.n_way or len(data.roles.novel)
    episode_lists = {
        k: sample_episodes(pool, n_way, k, protocol.n_query, protocol.n_test_episodes, protocol.seed)
        for k in protocol.shots
    }
    report = EvaluationReport(few_shot=[], generalised=[])
    with tracking.stage_run("evaluate"):
        tracking.log_dataset_input(data.dataset, "evaluation", "test", data.roles.novel)
        for k, episodes in episode_lists.items():
            tracking.log_dict_artifact(episodes, f"episodes/test_{k}shot.json")
        for method in config.methods:
            report.few_shot += _evaluate_method(
                method, context, features, subsets, episode_lists, config, report
            )
        if config.evaluation.oracle:
            oracle = [
                evaluate_oracle(
                    features["novel_train"], subsets["novel_train"].labels, features["novel_test"], pool, e
                )
                for e in episode_lists.values()
            ]
            _log_method_results("oracle", oracle)
            report.few_shot += oracle
        tracking.log_text_artifact(report.table(), "results.md")
        tracking.log_dict_artifact(summary_rows(report.few_shot + report.generalised), "results.json")
    return report


def _evaluate_method(
    method: MethodConfig,
    context: MethodContext,
    features: dict[str, torch.Tensor],
    subsets: dict[str, ClassSubset],
    episode_lists: dict[int, EpisodeList],
    config: Config,
    report: EvaluationReport,
) -> list[EpisodeResults]:
    """One method over every K: few-shot results (and generalised ones for frozen-feature methods)."""
    label = method.display_name
    create_method(method.name, context, **method.params)  # refuse bad names/params before any work
    factory = lambda: create_method(method.name, context, **method.params)  # noqa: E731
    pool = subsets["novel_test"]
    results = []
    spec, device = context.spec, context.device
    to_input = lambda images: to_model_input(images, spec.mean, spec.std, spec.in_chans, device)  # noqa: E731
    for all_episodes in episode_lists.values():
        episodes = _prefix(all_episodes, method)
        if METHODS[method.name].inputs == "features":
            result = evaluate_frozen(factory, features["novel_test"], pool, episodes, label=label)
        else:
            result = evaluate_images(factory, pool.images, pool, episodes, to_input, label=label)
        results.append(result)
        if config.evaluation.generalised and METHODS[method.name].inputs == "features":
            report.generalised.append(
                evaluate_generalised(
                    factory,
                    features["base_train"],
                    subsets["base_train"].labels,
                    features["base_test"],
                    subsets["base_test"].labels,
                    features["novel_test"],
                    pool,
                    episodes,
                    base_shots=config.evaluation.generalised_base_shots or episodes.k_shot,
                    n_episodes=config.evaluation.generalised_episodes,
                    seed=config.seed,
                    label=label,
                )
            )
    _log_method_results(label, results, [g for g in report.generalised if g.method == label])
    return results


def _log_method_results(
    label: str, results: list[EpisodeResults], generalised: list[EpisodeResults] | None = None
) -> None:
    """A nested run for the method with its metrics and per-episode CSVs; summaries on the pipeline run."""
    with tracking.stage_run(f"method:{label}", tags={"method": label}):
        for result in results:
            tracking.log_metrics(tracking.summary_metrics(result.summary(), "test", f"{result.k_shot}shot"))
            tracking.log_text_artifact(_per_episode_csv(result), f"per_episode/test_{result.k_shot}shot.csv")
        for result in generalised or []:
            tracking.log_metrics(
                tracking.summary_metrics(result.summary(), "generalised", f"{result.k_shot}shot")
            )
    pipeline_run = tracking.pipeline_run_id()
    for result in results:
        summary = tracking.summary_metrics(result.summary(), "test", f"{result.k_shot}shot", label)
        tracking.log_metrics(summary, run_id=pipeline_run)
    for result in generalised or []:
        summary = tracking.summary_metrics(result.summary(), "generalised", f"{result.k_shot}shot", label)
        tracking.log_metrics(summary, run_id=pipeline_run)
