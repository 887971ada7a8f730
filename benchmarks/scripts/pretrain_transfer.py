"""How well pretrained features transfer, epoch by epoch: the evidence behind a pretraining recipe.

Pretrains a backbone on the base classes (the config's ``pretrain`` section, early stopping off) and,
after every epoch, scores SimpleShot on the novel classes: 5-shot episodes of the val split (the
signal the protocol allows tuning on) and of the test split (for reading only), centring features on
the mean of every 10th base train image. Prints one JSON line per epoch with the base-class val
balanced accuracy beside them.

Run: ``python -m benchmarks.scripts.pretrain_transfer configs/ham10000.yaml``
``[--set pretrain.label_smoothing=0.1]``.
"""

from __future__ import annotations

import argparse
import json
import time

from fewshot_med.config import load_config
from fewshot_med.data import sample_episodes
from fewshot_med.data.transforms import channel_stats
from fewshot_med.evaluation import evaluate_frozen
from fewshot_med.methods import MethodContext, create_method
from fewshot_med.models import BackboneSpec, create_backbone, embed
from fewshot_med.pipelines.stages import load_data
from fewshot_med.runtime import resolve_device, seed_everything
from fewshot_med.training.pretrain import pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--val-episodes", type=int, default=200)
    parser.add_argument("--test-episodes", type=int, default=300)
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    device = resolve_device(config.runtime.device)
    seed_everything(config.seed)
    data = load_data(config)
    base_train, base_val = data.subset("train", "base"), data.subset("val", "base")
    pools = {"val": data.subset("val", "novel"), "test": data.subset("test", "novel")}
    n_way = len(data.roles.novel)
    episodes = {
        "val": sample_episodes(pools["val"], n_way, 5, 15, args.val_episodes, config.episodes.seed),
        "test": sample_episodes(pools["test"], n_way, 5, 15, args.test_episodes, config.episodes.seed),
    }
    mean, std = channel_stats(base_train.images)
    spec = BackboneSpec(config.model.backbone, 3, data.dataset.image_shape[0], mean, std)
    backbone = create_backbone(spec.name, spec.in_chans, spec.image_size)
    settings = config.pretrain.model_copy(update={"early_stopping_patience": None})
    print(json.dumps({"config": args.config, "overrides": args.overrides, "seed": config.seed,
                      "data_digest": data.dataset.digest}))  # fmt: skip

    def probe(metrics: dict[str, float], epoch: int) -> None:
        started = time.perf_counter()
        centring = embed(backbone, base_train.images[::10], spec, device).mean(dim=0)  # every 10th: cheap
        context = MethodContext(base_feature_mean=centring)
        record = {"epoch": epoch, "base_val_balanced_accuracy": metrics["val_balanced_accuracy"]}
        for split, pool in pools.items():
            features = embed(backbone, pool.images, spec, device)
            result = evaluate_frozen(
                lambda: create_method("simpleshot", context), features, pool, episodes[split]
            )
            record[f"novel_{split}_5shot_accuracy"] = result.summary()["accuracy"][0]
        record["train_loss"] = metrics["train_loss"]
        record["probe_seconds"] = time.perf_counter() - started
        print(json.dumps(record), flush=True)
        backbone.train()

    pretrain(backbone, spec, base_train, base_val, settings, device, log_metrics=probe, seed=config.seed)


if __name__ == "__main__":
    main()
