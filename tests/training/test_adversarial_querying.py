"""Adversarial querying (``meta_train.adversarial``) and PGD adversarial fine-tuning."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from torch import nn

from fewshot_med import tracking
from fewshot_med.config import AdversarialConfig, Config, MetaTrainConfig, load_config
from fewshot_med.data import select_classes
from fewshot_med.data.demo import DEMO_BASE_CLASSES, make_demo_dataset
from fewshot_med.data.transforms import to_model_input
from fewshot_med.errors import ConfigError, FewshotMedError
from fewshot_med.models import BackboneSpec, create_backbone
from fewshot_med.pipelines.transfer import run_stages
from fewshot_med.tracking import names
from fewshot_med.training.adversarial import (
    adversarial_finetune,
    check_pixel_space,
    input_pixels,
    model_input,
    pixels,
)
from fewshot_med.training.meta import ALGORITHMS, EpisodeBatch, adversarial_querying_step

CPU = torch.device("cpu")
EPSILON = 4 / 255
#: not the identity, so an attack placed after normalisation would break the pixel budget
SPEC = BackboneSpec("tiny", 3, 8, mean=(0.6, 0.5, 0.4), std=(0.2, 0.25, 0.1))


class TinyBackbone(nn.Sequential):
    """conv -> batch-norm -> ReLU -> mean pool: ``(B, 3, H, W)`` -> ``(B, 6)``."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images).flatten(1)


def _episode(n_way: int = 3, k_shot: int = 2, n_query: int = 4) -> EpisodeBatch:
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, (n_way * (k_shot + n_query), 8, 8, 3), dtype=np.uint8)
    labels = np.concatenate([np.repeat(np.arange(n_way), k_shot), np.repeat(np.arange(n_way), n_query)])
    return EpisodeBatch(
        images=to_model_input(images, SPEC.mean, SPEC.std, 3, CPU),
        labels=torch.from_numpy(labels),
        n_support=n_way * k_shot,
        n_way=n_way,
    )


def test_the_config_fills_in_madrys_step_and_refuses_bad_budgets_in_one_line():
    config = load_config("configs/quickstart.yaml", ["meta_train.adversarial={epsilon: 0.00784, steps: 7}"])
    assert config.meta_train.adversarial == AdversarialConfig(
        epsilon=0.00784, steps=7, step_size=2.5 * 0.00784 / 7
    )
    assert MetaTrainConfig().adversarial is None
    assert AdversarialConfig(epsilon=0.01, steps=2, step_size=0.003).step_size == 0.003
    refused = {
        "{epsilon: 8, steps: 3}": "meta_train.adversarial.epsilon: 8.0 is not a budget in pixel units",
        "{epsilon: 0, steps: 3}": "meta_train.adversarial.epsilon: 0.0 is not a budget in pixel units",
        "{epsilon: 0.01, steps: 0}": "meta_train.adversarial.steps: Input should be greater than or equal",
        "{epsilon: 0.01}": "meta_train.adversarial.steps: Field required",
        "{epsilon: 0.01, steps: 2, step_size: -1}": "adversarial.step_size: Input should be greater than 0",
        "{eps: 0.01, steps: 2}": "meta_train.adversarial.eps: unknown key",
    }
    for value, message in refused.items():
        with pytest.raises(ConfigError) as error:
            load_config("configs/quickstart.yaml", [f"meta_train.adversarial={value}"])
        assert message in str(error.value)
        assert "\n" not in str(error.value)


def test_pixels_and_model_input_are_inverse_maps():
    uint8 = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    batch = to_model_input(uint8, SPEC.mean, SPEC.std, 3, CPU)
    torch.testing.assert_close(model_input(pixels(uint8, SPEC, CPU), SPEC), batch)
    torch.testing.assert_close(input_pixels(batch, SPEC), torch.from_numpy(uint8).permute(0, 3, 1, 2) / 255)
    grey_spec = BackboneSpec("tiny", 3, 8, mean=(0.5,), std=(0.2,))
    grey = to_model_input(uint8[..., :1], grey_spec.mean, grey_spec.std, 3, CPU)  # repeated to 3 channels
    assert input_pixels(grey, grey_spec).shape == (4, 1, 8, 8)
    torch.testing.assert_close(model_input(input_pixels(grey, grey_spec), grey_spec), grey)
    with pytest.raises(FewshotMedError, match=r"meta_train.adversarial: .* 1 channel averaged from RGB"):
        check_pixel_space(
            BackboneSpec("tiny", 1, 8, mean=(0.5,) * 3, std=(0.2,) * 3), "meta_train.adversarial"
        )


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_queries_are_attacked_in_pixels_within_epsilon_and_the_support_stays_clean(name):
    torch.manual_seed(0)
    backbone = TinyBackbone().train()
    batch = _episode()
    settings = MetaTrainConfig(algorithm=name, inner_steps=2, adversarial={"epsilon": EPSILON, "steps": 5})
    seen = {}

    def capture(backbone, attacked, settings):
        seen["batch"] = attacked
        return ALGORITHMS[name].step(backbone, attacked, settings)

    algorithm = dataclasses.replace(ALGORITHMS[name], step=capture)
    running_mean = backbone[1].running_mean.clone()
    generator = torch.Generator().manual_seed(0)
    loss, _ = adversarial_querying_step(algorithm, SPEC, generator, backbone, batch, settings)
    attacked = seen["batch"]
    torch.testing.assert_close(attacked.support, batch.support)
    torch.testing.assert_close(attacked.labels, batch.labels)
    change = input_pixels(attacked.query, SPEC) - input_pixels(batch.query, SPEC)
    assert change.abs().max() <= EPSILON + 1e-5
    assert change.abs().max() > EPSILON / 2
    # the perturbation raises the loss of the adapted model the step trains on
    model = ALGORITHMS[name].episode_model(backbone, batch, settings)
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(batch.query), batch.query_labels)
        attacked_loss = F.cross_entropy(model(attacked.query), batch.query_labels)
    assert attacked_loss > clean_loss
    # the step's own update of the running statistics is the only one (the attack's passes use copies)
    assert loss > 0 and all(p.grad is not None for p in backbone.parameters())
    assert not torch.equal(backbone[1].running_mean, running_mean)


def test_episode_models_compute_the_steps_logits():
    torch.manual_seed(0)
    backbone = TinyBackbone().train()
    batch = _episode()
    settings = MetaTrainConfig(algorithm="protonet")
    logits = ALGORITHMS["protonet"].episode_model(backbone, batch, settings)(batch.query)
    features = backbone(batch.images)
    support, query = features[: batch.n_support], features[batch.n_support :]
    prototypes = torch.stack([support[batch.support_labels == c].mean(0) for c in range(batch.n_way)])
    torch.testing.assert_close(logits, -(torch.cdist(query, prototypes) ** 2), atol=1e-4, rtol=1e-4)


@pytest.fixture
def workdir(tmp_path, monkeypatch, empty_store):
    """A fresh working directory with an empty MLflow store at ``./mlruns``, one torch thread."""
    (tmp_path / "mlruns").mkdir()
    shutil.copy(empty_store, tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.set_num_threads(1)
    return tmp_path


def test_the_pipeline_meta_trains_on_attacked_queries_and_logs_the_settings(workdir, tiny_pipeline):
    adversarial = {"epsilon": EPSILON, "steps": 2}
    tiny_pipeline["meta_train"] |= {"adversarial": adversarial, "keep": "last"}
    config = Config.model_validate(tiny_pipeline)
    outcome = run_stages(config, ("pretrain", "meta_train"))
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    (meta,) = client.search_runs(
        [client.get_run(outcome.run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{outcome.run_id}' and tags.stage = '{names.META_TRAIN}'",
    )
    params = meta.data.params
    assert float(params["adversarial.epsilon"]) == EPSILON
    assert int(params["adversarial.steps"]) == 2
    assert float(params["adversarial.step_size"]) == pytest.approx(2.5 * EPSILON / 2)
    assert params["keep"] == "last"
    assert meta.data.metrics[names.stage_metric(names.META_TRAIN, "seconds_per_episode")] > 0
    config_paths = frozenset(tracking.flatten_params(config.model_dump(mode="json")))
    vocabulary = names.Vocabulary((1, 5), ("simpleshot",), (), ("accuracy",), (), config_paths=config_paths)
    assert all(names.is_defined("param", key, names.META_TRAIN, vocabulary) for key in params)


@pytest.fixture(scope="module")
def pool():
    """Base classes of a small demo train split, 16 px."""
    dataset = make_demo_dataset(image_size=16, images_per_common_class=40, images_per_rare_class=40)
    return select_classes(dataset, "train", DEMO_BASE_CLASSES)


def test_adversarial_finetuning_trains_backbone_and_head_on_attacked_batches(pool):
    torch.manual_seed(0)
    backbone = TinyBackbone()
    before = [p.detach().clone() for p in backbone.parameters()]
    attack = AdversarialConfig(epsilon=EPSILON, steps=2)
    result = adversarial_finetune(backbone, SPEC, pool, attack, steps=3, batch_size=8, device=CPU, lr=1e-2)
    assert len(result.losses) == len(result.accuracies) == 3 and result.seconds_per_step > 0
    assert result.head.weight.shape == (len(DEMO_BASE_CLASSES), TinyBackbone.num_features)
    assert not all(torch.equal(a, b) for a, b in zip(before, backbone.parameters(), strict=True))
    assert not backbone.training


def test_adversarial_finetuning_runs_where_the_last_feature_map_is_one_pixel(pool):
    # a ResNet on 16 px images ends on a 1 x 1 map: batch norm in training mode needs more than one
    # image there, so the attack must not probe the training backbone with a single image
    torch.manual_seed(0)
    backbone = create_backbone("resnet10t", in_chans=3, image_size=16)
    spec = BackboneSpec("resnet10t", 3, backbone.num_features, mean=SPEC.mean, std=SPEC.std)
    attack = AdversarialConfig(epsilon=EPSILON, steps=1)
    result = adversarial_finetune(backbone, spec, pool, attack, steps=1, batch_size=4, device=CPU)
    assert len(result.losses) == 1 and np.isfinite(result.losses[0])


def test_adversarial_finetuning_starts_from_the_nearest_class_mean_head(pool):
    torch.manual_seed(0)
    backbone = TinyBackbone()
    attack = AdversarialConfig(epsilon=EPSILON, steps=2)
    head = adversarial_finetune(backbone, SPEC, pool, attack, steps=0, batch_size=8, device=CPU).head
    with torch.no_grad():
        features = backbone(to_model_input(pool.images, SPEC.mean, SPEC.std, 3, CPU))
        means = torch.stack(
            [features[torch.from_numpy(pool.labels == c)].mean(0) for c in range(head.out_features)]
        )
        nearest = torch.cdist(features, means).argmin(dim=1)
        torch.testing.assert_close(head(features).argmax(dim=1), nearest)
        torch.testing.assert_close(head.weight, 2 * means, atol=1e-5, rtol=1e-5)
