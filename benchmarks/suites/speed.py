"""The speed suite: what fewshot-med costs in time and memory against the plainest alternatives.

Six measurements, all on the real HAM10000 file (the 28 px file in quick mode), CPU only:

1. Pretraining throughput against a bare PyTorch loop: same resnet10t, base-class train images,
   batch 128, optimizer and threads, no augmentation; bare, ours, bare again in one process (see
   ``benchmarks.suites.throughput``), so loop overhead shows as a ratio and drift as two bare numbers.
2. Evaluating 3-way 5-shot episodes of the novel test classes (600, or 20 in quick mode): the limit
   (one forward pass over the pool), ours (embed once, then ``evaluate_frozen`` fits all episodes in
   one batched call and computes every metric) and easyfsl's own loop (features recomputed per episode,
   as its ``evaluate`` does). A random-init backbone: timing does not depend on the weights.
3. Peak resident memory (``ru_maxrss``) of every measurement, each in a fresh child process. Children
   are forked from a forkserver that has only imported the libraries: ``spawn`` would not do, because
   Linux keeps a process's peak across ``exec``, so a spawned child would report its parent's peak.
4. MLflow overhead: a short pretraining inside a tracked run (SQLite store in a temporary folder)
   against the same run untracked, and in full mode the whole quickstart pipeline tracked and untracked.
5. Prediction on files, as ``fewshot-med predict`` runs it (``predict_files``: read, classify, table)
   against the bare backbone forward pass on the same decoded images; reading the files alone
   (``load_inputs``) is timed separately, so the classifier's own overhead shows as a ratio.
6. Data larger than memory: pretraining on the base-class images decoded from PNG files into the
   on-disk cache (memory-mapped) against the same pixels in memory (``benchmarks.suites.streaming``).

Why: the guide asks for a lean loop (ratio near 1 or above), evaluation close to the cost of one
forward pass (at least 10x faster than easyfsl), tracking that costs little, and a deployed classifier
whose cost beyond reading the files is the forward pass.
"""

from __future__ import annotations

import csv
import io
import math
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.common import SuiteOptions, SuiteReport, require_modules
from benchmarks.suites import streaming

#: Peer libraries the suite imports (the ``bench`` extra).
REQUIRES = ("easyfsl",)
REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
BACKBONE = "resnet10t"
BATCH_SIZE = 128
N_WAY, K_SHOT, N_QUERY = 3, 5, 15
#: what the forkserver imports once, so every child starts at the same, already-paid baseline
PRELOAD = [
    "torch",
    "timm",
    "numpy",
    "fewshot_med.data",
    "fewshot_med.models",
    "fewshot_med.evaluation",
    "fewshot_med.methods",
    "fewshot_med.training.pretrain",
    "benchmarks.suites.throughput",
]
#: the quickstart pipeline shrunk to a few steps of every stage: a smoke test of the full-mode-only
#: pipeline measurement, ``measure(options, dataclasses.replace(QUICK, pipeline=TINY_PIPELINE))``
TINY_PIPELINE = (
    "data.image_size=16",
    "pretrain.epochs=1",
    "pretrain.steps_per_epoch=2",
    "pretrain.batch_size=32",
    "meta_train.episodes=2",
    "meta_train.val_every=2",
    "meta_train.n_query=3",
    "methods=[{name: simpleshot}]",
    "episodes.shots=[1]",
    "episodes.n_test_episodes=4",
    "episodes.n_val_episodes=4",
    "episodes.n_query=5",
    "evaluation.generalised_episodes=2",
    "evaluation.plots=false",
)


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is.

    Attributes:
        dataset: catalogue name of the HAM10000 file.
        pretrain_steps: timed steps of each pretraining run.
        episodes: evaluation episodes.
        repeats: timings of the forward pass and of our evaluation; the median is reported.
        tracking_epochs: epochs of the short pretraining of the MLflow measurement.
        tracking_steps: steps per epoch of that pretraining.
        pipeline: ``--set`` overrides of the quickstart pipeline; ``None`` skips the pipeline.
        predict_files: PNG files classified by the prediction measurement (the novel test images,
            cycled).
        streaming_images: images of each split the streaming measurement writes and decodes; all of
            the base-class train and val images when ``None``.
    """

    dataset: str
    pretrain_steps: int
    episodes: int
    repeats: int
    tracking_epochs: int
    tracking_steps: int
    pipeline: tuple[str, ...] | None
    predict_files: int = 512
    streaming_images: int | None = None


QUICK = Sizes("ham10000-28", 3, 20, 1, 2, 2, None, 64, 1024)
FULL = Sizes("ham10000", 20, 600, 5, 3, 10, (), 512)
#: Images per batch of the prediction measurement (``fewshot-med predict``'s default).
PREDICT_BATCH = 64


@dataclass(frozen=True)
class _Task:
    """One measurement, run in a child process."""

    kind: str
    sizes: Sizes
    threads: int | None
    seed: int
    workdir: str
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None


@dataclass
class _Measured:
    """Every child's result, by kind."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, kind: str) -> dict[str, Any]:
        return self.results[kind]


def run(options: SuiteOptions) -> SuiteReport:
    """Run the speed suite (quick: tiny sizes, about 95 s on one core; full: about 10-15 minutes on 2 cores).

    Each measurement runs in a child process, so a script calling this needs the usual
    ``if __name__ == "__main__":`` guard.

    Args:
        options: ``quick``, ``seed`` and ``threads`` are read; ``backbone_runs`` is not (timing does
            not depend on the weights).

    Returns:
        The ``## Speed`` section, headline metrics (``speed.*``), the record and a CSV of every number.

    Raises:
        ImportError: easyfsl (the ``bench`` extra) is not installed.
        FewshotMedError: the HAM10000 file is missing, or a child process died before reporting.
    """
    return measure(options, QUICK if options.quick else FULL)


def measure(options: SuiteOptions, sizes: Sizes) -> SuiteReport:
    """``run`` with explicit sizes."""
    from fewshot_med.errors import FewshotMedError

    require_modules(REQUIRES)  # before any work
    kinds = ["baseline", "pretrain.compare", "pretrain.bare", "pretrain.ours"]
    kinds += ["eval.forward", "eval.ours", "eval.easyfsl", "predict", "tracking.off", "tracking.on"]
    kinds += ["streaming"]
    if sizes.pipeline is not None:
        kinds += ["pipeline.off", "pipeline.on"]
    measured = _Measured()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fewshot-med-speed-") as workdir:
        task = _Task("baseline", sizes, options.threads, options.seed, workdir)
        for kind in kinds:
            measured.results[kind] = _in_child(replace(task, kind=kind))
            if kind == "baseline":
                task = replace(task, stats=measured[kind]["stats"])
    digests = {r["data_digest"] for r in measured.results.values() if "data_digest" in r}
    if len(digests) != 1:
        raise FewshotMedError(f"speed suite: the children read different data (digests {sorted(digests)})")
    return _report(options, sizes, measured, time.perf_counter() - started)


# --------------------------------------------------------------------------- child processes


def _in_child(task: _Task) -> dict[str, Any]:
    """Run one measurement in a fresh process; its result with ``peak_rss_gib``.

    A child that dies before reporting raises instead of hanging (a script that runs the suite needs
    an ``if __name__ == "__main__":`` guard, as any multiprocessing program does).
    """
    from multiprocessing.connection import wait

    from fewshot_med.errors import FewshotMedError

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(PRELOAD)  # no effect once the forkserver runs
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(task, writer), name=f"speed-{task.kind}", daemon=True)
    process.start()
    writer.close()
    outcome = None
    try:
        wait([reader, process.sentinel])
        if reader.poll():
            outcome = reader.recv()
    except EOFError:
        pass
    finally:
        process.join()
        reader.close()
    if outcome is None:
        raise FewshotMedError(
            f"speed suite: the child process measuring {task.kind} exited with code {process.exitcode} "
            "before reporting (a script that runs the suite needs an `if __name__ == '__main__':` guard)"
        )
    status, payload, details = outcome
    if status == "ok":
        return payload
    if isinstance(payload, (FewshotMedError, ImportError)):
        raise payload
    raise RuntimeError(f"speed suite: {task.kind} failed in its child process:\n{details}")


def _child(task: _Task, connection: Any) -> None:
    """Measure in this child process; send ``("ok", result, "")`` or ``("error", exception, traceback)``."""
    try:
        import torch

        if task.threads is not None:
            torch.set_num_threads(task.threads)
        result = _MEASUREMENTS[task.kind](task)
        result.setdefault("peak_rss_gib", _peak_rss_gib())
        result["torch_threads"] = torch.get_num_threads()
        connection.send(("ok", result, ""))
    except BaseException as error:
        details = traceback.format_exc()
        try:
            connection.send(("error", error, details))
        except Exception:  # an exception that does not pickle
            connection.send(("error", None, details))
    finally:
        connection.close()


def _peak_rss_gib() -> float:
    """This process's peak resident memory (``ru_maxrss``: KiB on Linux, bytes on macOS) in GiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def _load(task: _Task) -> dict[str, Any]:
    """The HAM10000 subsets every measurement reads, and the backbone spec (stats from the baseline)."""
    from fewshot_med.data import default_roles, load_dataset, select_classes
    from fewshot_med.models import BackboneSpec

    dataset = load_dataset(task.sizes.dataset)
    roles = default_roles(task.sizes.dataset)
    assert roles is not None  # catalogue entries of HAM10000 carry roles
    data = {
        "dataset": dataset,
        "train": select_classes(dataset, "train", roles.base),
        "val": select_classes(dataset, "val", roles.base),
        "pool": select_classes(dataset, "test", roles.novel),
    }
    if task.stats is not None:
        mean, std = task.stats
        data["spec"] = BackboneSpec(BACKBONE, 3, dataset.image_shape[0], mean, std)
    return data


def _baseline(task: _Task) -> dict[str, Any]:
    """Imports plus the data loaded; then the channel statistics every other child reuses."""
    from fewshot_med.data.transforms import channel_stats

    data = _load(task)
    peak = _peak_rss_gib()  # before channel_stats: its float64 copy of the images is a one-off
    dataset = data["dataset"]
    return {
        "peak_rss_gib": peak,
        "stats": channel_stats(data["train"].images),
        "data_digest": dataset.digest,
        "image_size": dataset.image_shape[0],
        "n_train": len(data["train"]),
        "n_val": len(data["val"]),
        "n_pool": len(data["pool"]),
    }


def _pretrain_compare(task: _Task) -> dict[str, Any]:
    from benchmarks.suites.throughput import compare

    data = _load(task)
    steps = task.sizes.pretrain_steps
    result = compare(data["train"], data["val"], data["spec"], BATCH_SIZE, steps, task.seed)
    return {
        "bare_before": result.bare_before,
        "ours": result.ours,
        "bare_after": result.bare_after,
        "bare_channels_last": result.bare_channels_last,
        "data_digest": data["dataset"].digest,
    }


def _streaming(task: _Task) -> dict[str, Any]:
    """Cached (memmap) against in-memory pretraining throughput (``benchmarks.suites.streaming``)."""
    sizes = task.sizes
    return streaming.measure(
        sizes.dataset, sizes.pretrain_steps, BATCH_SIZE, task.seed, task.workdir, sizes.streaming_images
    )


def _pretrain_alone(task: _Task) -> dict[str, Any]:
    from benchmarks.suites.throughput import bare_loop, loop_settings, our_loop

    data = _load(task)
    steps = task.sizes.pretrain_steps
    settings = loop_settings(BATCH_SIZE, steps)
    if task.kind == "pretrain.bare":
        images_per_second = bare_loop(data["train"], data["spec"], settings, steps, task.seed)
    else:
        images_per_second = our_loop(data["train"], data["val"], data["spec"], settings, task.seed)
    return {"images_per_second": images_per_second, "data_digest": data["dataset"].digest}


def _evaluation_setup(task: _Task) -> tuple[dict[str, Any], Any, Any]:
    """Data, a seeded random-init backbone warmed up on 8 images, and the stacked episode list."""
    import torch

    from fewshot_med.data import sample_episodes
    from fewshot_med.models import create_backbone, embed

    data = _load(task)
    spec, pool = data["spec"], data["pool"]
    torch.manual_seed(task.seed)
    backbone = create_backbone(spec.name, spec.in_chans, spec.image_size).eval()
    embed(backbone, pool.images[:8], spec, torch.device("cpu"))  # warm-up, the same for every measurement
    episodes = sample_episodes(pool, N_WAY, K_SHOT, N_QUERY, task.sizes.episodes, task.seed)
    episodes.arrays  # noqa: B018  (stacked before any timing, for ours and easyfsl alike)
    return data, backbone, episodes


def _eval_forward(task: _Task) -> dict[str, Any]:
    import torch

    from fewshot_med.models import embed

    data, backbone, _ = _evaluation_setup(task)
    timings = []
    for _ in range(task.sizes.repeats):
        start = time.perf_counter()
        embed(backbone, data["pool"].images, data["spec"], torch.device("cpu"))
        timings.append(time.perf_counter() - start)
    return {"seconds": statistics.median(timings), "data_digest": data["dataset"].digest}


def _eval_ours(task: _Task) -> dict[str, Any]:
    import torch

    from fewshot_med.evaluation import evaluate_frozen
    from fewshot_med.methods import MethodContext, create_method
    from fewshot_med.models import embed

    data, backbone, episodes = _evaluation_setup(task)
    timings: dict[str, list[float]] = {"embed": [], "simpleshot": [], "protonet": []}
    accuracy: dict[str, float] = {}
    for _ in range(task.sizes.repeats):
        start = time.perf_counter()
        features = embed(backbone, data["pool"].images, data["spec"], torch.device("cpu"))
        timings["embed"].append(time.perf_counter() - start)
        for name in ("simpleshot", "protonet"):
            start = time.perf_counter()
            context = MethodContext(base_feature_mean=features.mean(dim=0))
            results = evaluate_frozen(
                lambda name=name, context=context: create_method(name, context),
                features,
                data["pool"],
                episodes,
                label=name,
            )
            timings[name].append(time.perf_counter() - start)
            accuracy[name] = float(results.metrics["accuracy"].mean())
    seconds = {name: statistics.median(values) for name, values in timings.items()}
    return {
        "seconds": seconds,
        "accuracy": accuracy,
        "n_episodes": len(episodes),
        "n_query": episodes.n_query,
        "episode_digest": episodes.digest(),
        "data_digest": data["dataset"].digest,
    }


def _eval_easyfsl(task: _Task) -> dict[str, Any]:
    import numpy as np
    import torch

    from fewshot_med.data.transforms import to_model_input

    require_modules(REQUIRES)
    from easyfsl.methods import PrototypicalNetworks, SimpleShot

    data, backbone, episodes = _evaluation_setup(task)
    pool, spec = data["pool"], data["spec"]
    images = to_model_input(pool.images, spec.mean, spec.std, spec.in_chans)  # normalised once, untimed
    position = np.full(int(pool.indices.max()) + 1, -1, dtype=np.int64)
    position[pool.indices] = np.arange(len(pool))  # split row -> pool row
    arrays = episodes.arrays
    support = torch.from_numpy(position[arrays.support_rows])
    query = torch.from_numpy(position[arrays.query_rows])
    support_labels = torch.from_numpy(arrays.support_labels)
    query_labels = torch.from_numpy(arrays.query_labels)
    seconds, accuracy = {}, {}
    for name, method in (("simpleshot", SimpleShot), ("protonet", PrototypicalNetworks)):
        model = method(backbone).eval()
        correct = 0
        start = time.perf_counter()
        with torch.no_grad():
            for episode in range(len(episodes)):
                model.process_support_set(images[support[episode]], support_labels[episode])
                scores = model(images[query[episode]])
                correct += int((scores.argmax(dim=1) == query_labels[episode]).sum())
        seconds[name] = time.perf_counter() - start
        accuracy[name] = correct / query_labels.numel()
    return {
        "seconds": seconds,
        "accuracy": accuracy,
        "version": metadata.version("easyfsl"),
        "episode_digest": episodes.digest(),
        "data_digest": data["dataset"].digest,
    }


def _predict(task: _Task) -> dict[str, Any]:
    """``predict_files`` on PNG files against the bare forward pass over the same decoded images.

    The files are the novel test images (cycled to ``predict_files``), written untimed; the classifier
    is ProtoNet on a seeded random-init backbone, fitted on 5 images per class. One untimed read and
    forward pass warm up MONAI's reader and the backbone first.
    """
    import numpy as np
    import torch
    from PIL import Image

    from fewshot_med.data.transforms import to_model_input
    from fewshot_med.deploy import Preprocessing, fit_classifier, load_inputs
    from fewshot_med.deploy.batch import predict_files
    from fewshot_med.methods import MethodContext, create_method
    from fewshot_med.models import create_backbone

    data = _load(task)
    spec, pool = data["spec"], data["pool"]
    folder = Path(task.workdir, "predict")
    folder.mkdir()
    rows = np.resize(np.arange(len(pool)), task.sizes.predict_files)
    paths = [folder / f"{n:05d}.png" for n in range(len(rows))]
    for path, row in zip(paths, rows, strict=True):
        Image.fromarray(pool.images[row]).save(path)
    torch.manual_seed(task.seed)
    backbone = create_backbone(spec.name, spec.in_chans, spec.image_size).eval()
    classes = range(len(pool.class_names))
    support = np.concatenate([np.flatnonzero(pool.labels == c)[:K_SHOT] for c in classes])
    preprocessing = Preprocessing(spec.image_size, pool.images.shape[-1])
    classifier = fit_classifier(
        backbone,
        spec,
        create_method("protonet", MethodContext()),
        pool.images[support],
        pool.labels[support],
        pool.class_names,
        1.0,
        torch.device("cpu"),
        preprocessing,
    )
    images, _ = load_inputs(paths[:PREDICT_BATCH], preprocessing)  # warm-up: MONAI reader, backbone
    classifier.predict_proba(images)

    def forward(decoded: np.ndarray) -> None:
        with torch.inference_mode():
            for start in range(0, len(decoded), PREDICT_BATCH):
                batch = decoded[start : start + PREDICT_BATCH]
                backbone(to_model_input(batch, spec.mean, spec.std, spec.in_chans))

    timings: dict[str, list[float]] = {"read": [], "forward": [], "classifier": [], "files": []}
    files = [(str(path), path) for path in paths]
    for _ in range(task.sizes.repeats):
        start = time.perf_counter()
        decoded, errors = load_inputs(paths, preprocessing)
        timings["read"].append(time.perf_counter() - start)
        start = time.perf_counter()
        forward(decoded)
        timings["forward"].append(time.perf_counter() - start)
        start = time.perf_counter()
        probs = classifier.predict_proba(decoded)
        timings["classifier"].append(time.perf_counter() - start)
        start = time.perf_counter()
        table = predict_files(classifier, files, PREDICT_BATCH)
        timings["files"].append(time.perf_counter() - start)
    if any(errors) or not np.allclose(table[list(pool.class_names)].to_numpy(), probs):
        raise ValueError("speed suite: predict on files disagrees with the classifier on the decoded images")
    return {
        "seconds": {name: statistics.median(values) for name, values in timings.items()},
        "n_files": len(paths),
        "data_digest": data["dataset"].digest,
    }


def _store_uri(task: _Task) -> str:
    return f"sqlite:///{Path(task.workdir, 'mlflow.db').as_posix()}"


def _initialise_store(uri: str) -> float:
    """Create the SQLite store (schema migrations run once per store); seconds it took."""
    from fewshot_med import tracking

    start = time.perf_counter()
    tracking.initialise_store(uri)
    return time.perf_counter() - start


def _tracking(task: _Task) -> dict[str, Any]:
    """A short pretraining inside a pipeline run and a stage run, tracked or not."""
    import torch

    from fewshot_med import tracking
    from fewshot_med.config import load_config
    from fewshot_med.models import create_backbone
    from fewshot_med.training.pretrain import pretrain

    on = task.kind == "tracking.on"
    data = _load(task)
    spec = data["spec"]
    config = load_config(
        QUICKSTART,
        [
            "name=speed-tracking",
            f"data.source={task.sizes.dataset}",
            f"data.image_size={spec.image_size}",
            f"pretrain.epochs={task.sizes.tracking_epochs}",
            f"pretrain.steps_per_epoch={task.sizes.tracking_steps}",
            f"seed={task.seed}",
            f"tracking.enabled={str(on).lower()}",
            f"tracking.tracking_uri={_store_uri(task)}",
            "tracking.registered_model=null",
        ],
    )
    store_seconds = _initialise_store(_store_uri(task)) if on else 0.0
    torch.manual_seed(task.seed)
    backbone = create_backbone(spec.name, spec.in_chans, spec.image_size)
    start = time.perf_counter()
    with (
        tracking.pipeline_run(config, run_name=task.kind),  # no-ops when tracking is off
        tracking.stage_run("pretrain", params=config.pretrain.model_dump()),
    ):
        train_start = time.perf_counter()
        pretrain(
            backbone,
            spec,
            data["train"],
            data["val"],
            config.pretrain,
            torch.device("cpu"),
            log_metrics=tracking.stage_metrics_logger("pretrain") if on else None,
            seed=config.seed,
        )
        train_seconds = time.perf_counter() - train_start
    return {
        "seconds": time.perf_counter() - start,
        "train_seconds": train_seconds,
        "store_seconds": store_seconds,
        "data_digest": data["dataset"].digest,
    }


def _pipeline(task: _Task) -> dict[str, Any]:
    """The quickstart pipeline (``run_stages``), tracked or not; tracked it also registers a model."""
    from fewshot_med.config import load_config
    from fewshot_med.pipelines.transfer import run_stages

    on = task.kind == "pipeline.on"
    overrides = [
        f"tracking.enabled={str(on).lower()}",
        f"tracking.tracking_uri={_store_uri(task)}",
        f"runtime.output_dir={Path(task.workdir, task.kind).as_posix()}",
        "runtime.device=cpu",
        f"seed={task.seed}",
        *([f"runtime.num_threads={task.threads}"] if task.threads else []),
        *(task.sizes.pipeline or ()),
    ]
    config = load_config(QUICKSTART, overrides)
    if on:
        _initialise_store(_store_uri(task))
    start = time.perf_counter()
    outcome = run_stages(config)
    return {"seconds": time.perf_counter() - start, "stages": dict(outcome.seconds)}


_MEASUREMENTS: dict[str, Callable[[_Task], dict[str, Any]]] = {
    "baseline": _baseline,
    "pretrain.compare": _pretrain_compare,
    "pretrain.bare": _pretrain_alone,
    "pretrain.ours": _pretrain_alone,
    "eval.forward": _eval_forward,
    "eval.ours": _eval_ours,
    "eval.easyfsl": _eval_easyfsl,
    "predict": _predict,
    "tracking.off": _tracking,
    "tracking.on": _tracking,
    "pipeline.off": _pipeline,
    "pipeline.on": _pipeline,
    "streaming": _streaming,
}

#: what each child ran, for the memory table
_MEMORY_ROWS = {
    "baseline": "imports + HAM10000 loaded (every child's starting point)",
    "pretrain.bare": "bare PyTorch pretraining loop",
    "pretrain.ours": "fewshot-med pretraining (with its validation pass)",
    "pretrain.compare": "the throughput comparison (all four loops in one process)",
    "eval.forward": "one forward pass over the pool (repeated)",
    "eval.ours": "fewshot-med: embed + simpleshot + protonet on all episodes",
    "eval.easyfsl": "easyfsl: SimpleShot + PrototypicalNetworks, per-episode loop",
    "predict": "prediction on PNG files (reading, forward passes, `predict_files`)",
    "tracking.off": "short pretraining, tracking off",
    "tracking.on": "short pretraining, tracked in MLflow",
    "pipeline.off": "quickstart pipeline, tracking off",
    "pipeline.on": "quickstart pipeline, tracked (and model registered)",
    "streaming": "PNG files decoded into the on-disk cache, pretraining cached and in memory",
}


# --------------------------------------------------------------------------- the report


def _report(options: SuiteOptions, sizes: Sizes, measured: _Measured, wall: float) -> SuiteReport:
    """Tables, metrics, record and CSV from the children's results."""
    base, compare = measured["baseline"], measured["pretrain.compare"]
    forward, ours, peer = measured["eval.forward"], measured["eval.ours"], measured["eval.easyfsl"]
    off, on = measured["tracking.off"], measured["tracking.on"]
    predict = measured["predict"]["seconds"]
    n_files = measured["predict"]["n_files"]
    threads = compare["torch_threads"]
    bare_mean = (compare["bare_before"] + compare["bare_after"]) / 2
    embed_seconds = ours["seconds"]["embed"]
    ours_seconds = {name: embed_seconds + ours["seconds"][name] for name in ("simpleshot", "protonet")}
    ours_total = ours["seconds"]["embed"] + ours["seconds"]["simpleshot"] + ours["seconds"]["protonet"]
    peer_total = peer["seconds"]["simpleshot"] + peer["seconds"]["protonet"]
    metrics = {
        "speed.pretrain.bare_first_images_per_s": compare["bare_before"],
        "speed.pretrain.ours_images_per_s": compare["ours"],
        "speed.pretrain.bare_second_images_per_s": compare["bare_after"],
        "speed.pretrain.bare_images_per_s": bare_mean,
        "speed.pretrain.bare_channels_last_images_per_s": compare["bare_channels_last"],
        "speed.pretrain.ratio": compare["ours"] / bare_mean,
        "speed.pretrain.ratio_channels_last": compare["ours"] / compare["bare_channels_last"],
        "speed.pretrain.alone.bare_images_per_s": measured["pretrain.bare"]["images_per_second"],
        "speed.pretrain.alone.ours_images_per_s": measured["pretrain.ours"]["images_per_second"],
        "speed.eval.forward_s": forward["seconds"],
        "speed.eval.ours_s": ours_total,
        "speed.eval.ours.simpleshot_s": ours_seconds["simpleshot"],
        "speed.eval.ours.protonet_s": ours_seconds["protonet"],
        "speed.eval.ours_over_forward": ours_total / forward["seconds"],
        "speed.eval.easyfsl_s": peer_total,
        "speed.eval.easyfsl.simpleshot_s": peer["seconds"]["simpleshot"],
        "speed.eval.easyfsl.protonet_s": peer["seconds"]["protonet"],
        "speed.eval.speedup": peer_total / ours_total,
        "speed.eval.speedup.simpleshot": peer["seconds"]["simpleshot"] / ours_seconds["simpleshot"],
        "speed.eval.speedup.protonet": peer["seconds"]["protonet"] / ours_seconds["protonet"],
        "speed.predict.read_s": predict["read"],
        "speed.predict.forward_s": predict["forward"],
        "speed.predict.classifier_s": predict["classifier"],
        "speed.predict.files_s": predict["files"],
        "speed.predict.files_images_per_s": n_files / predict["files"],
        "speed.predict.overhead_ratio": (predict["files"] - predict["read"]) / predict["forward"],
        "speed.tracking.pretrain.off_s": off["seconds"],
        "speed.tracking.pretrain.on_s": on["seconds"],
        "speed.tracking.pretrain.ratio": on["seconds"] / off["seconds"],
        "speed.tracking.pretrain.train_ratio": on["train_seconds"] / off["train_seconds"],
        "speed.tracking.store_init_s": on["store_seconds"],
        "speed.wall_s": wall,
    }
    if "pipeline.on" in measured.results:
        pipe_off, pipe_on = measured["pipeline.off"]["seconds"], measured["pipeline.on"]["seconds"]
        metrics.update(
            {
                "speed.tracking.pipeline.off_s": pipe_off,
                "speed.tracking.pipeline.on_s": pipe_on,
                "speed.tracking.pipeline.ratio": pipe_on / pipe_off,
            }
        )
    streamed = measured["streaming"]
    metrics["speed.streaming.ratio"] = streamed["ratio"]
    metrics["speed.streaming.cached_images_per_s"] = statistics.mean(streamed["cached"])
    metrics["speed.streaming.in_memory_images_per_s"] = statistics.mean(streamed["in_memory"])
    for kind, result in measured.results.items():
        metrics[f"speed.memory.{kind.replace('.', '_')}_gib"] = result["peak_rss_gib"]
    bad = {key: value for key, value in metrics.items() if not math.isfinite(value)}
    if bad:
        raise ValueError(f"speed suite: non-finite measurements {bad}")

    size, n_pool, n_episodes = base["image_size"], base["n_pool"], ours["n_episodes"]
    record = {
        "speed.dataset": sizes.dataset,
        "speed.data_digest": base["data_digest"],
        "speed.episode_digest": ours["episode_digest"],
        "speed.quick": str(options.quick),
        "speed.seed": str(options.seed),
        "speed.torch_threads": str(threads),
        "speed.sizes": repr(sizes),
        "speed.backbone": f"{BACKBONE} (random init), {size} px",
        "speed.pretrain": f"batch {BATCH_SIZE}, {sizes.pretrain_steps} timed steps per loop, no augmentation",
        "speed.episodes": f"{n_episodes} x {N_WAY}-way {K_SHOT}-shot {ours['n_query']} queries, test novel",
        "speed.easyfsl_version": peer["version"],
    }
    if ours["episode_digest"] != peer["episode_digest"]:
        raise ValueError("speed suite: ours and easyfsl ran different episode lists")

    lines = ["## Speed", ""]
    if options.quick:
        lines += ["> Quick run (tiny sizes): these numbers only show the suite works; they mean nothing.", ""]
    lines += [
        f"HAM10000 ({size} px, data digest `{base['data_digest'][:12]}`), resnet10t, CPU, {threads} torch "
        f"thread(s); each measurement in its own child process. Suite wall time {wall:.0f} s.",
        "",
        "### Pretraining throughput",
        "",
        "| loop (in this order, one process) | images/s |",
        "|---|---:|",
        f"| bare PyTorch loop | {compare['bare_before']:.0f} |",
        f"| fewshot-med `pretrain` | {compare['ours']:.0f} |",
        f"| bare PyTorch loop, again | {compare['bare_after']:.0f} |",
        f"| bare PyTorch loop, channels_last | {compare['bare_channels_last']:.0f} |",
        f"| **ratio ours / mean of the two bare runs** | **{metrics['speed.pretrain.ratio']:.2f}** |",
        f"| ratio ours / bare channels_last | {metrics['speed.pretrain.ratio_channels_last']:.2f} |",
        "",
        f"- {base['n_train']} base-class train images, batch {BATCH_SIZE}, {sizes.pretrain_steps} timed "
        "steps per loop after one untimed warm-up step; AdamW with the same parameter groups, learning rate, "
        "weight decay and label smoothing; no augmentation.",
        "- Images/s = steps x batch / wall time of the training steps (ours: its reported "
        "`images_per_second`, which leaves out its validation pass).",
        "- The bare loop samples uniform random batches and converts them to contiguous NCHW float; ours "
        "samples class-balanced batches and trains in channels_last (its only CPU speed trick), "
        "hence the channels_last control.",
        "",
        f"### Evaluating {n_episodes} episodes",
        "",
        f"{n_episodes} episodes, {N_WAY}-way {K_SHOT}-shot {ours['n_query']} queries, drawn from the "
        f"{n_pool} test images of the novel classes (akiec, df, vasc), seed {options.seed}.",
        "",
        "| what | simpleshot (s) | protonet (s) | both (s) | speed-up vs easyfsl | mean accuracy (ss / pn) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| the limit: one forward pass over the {n_pool} images | | | {forward['seconds']:.3f} | | |",
        f"| fewshot-med: embed once + `evaluate_frozen` (all metrics) | {ours_seconds['simpleshot']:.3f} "
        f"| {ours_seconds['protonet']:.3f} | {ours_total:.3f} | **{metrics['speed.eval.speedup']:.0f}x** "
        f"| {ours['accuracy']['simpleshot']:.3f} / {ours['accuracy']['protonet']:.3f} |",
        f"| easyfsl {peer['version']}: per-episode loop | {peer['seconds']['simpleshot']:.2f} "
        f"| {peer['seconds']['protonet']:.2f} | {peer_total:.2f} | 1x "
        f"| {peer['accuracy']['simpleshot']:.3f} / {peer['accuracy']['protonet']:.3f} |",
        "",
        f"- Ours / limit = {metrics['speed.eval.ours_over_forward']:.2f}. Limit and ours: medians of "
        f"{sizes.repeats} timing(s); easyfsl: one timing of all {n_episodes} episodes (no extrapolation).",
        "- Ours per method = the one forward pass + that method's batched fit and metrics; both = one "
        "forward pass + both methods.",
        "- easyfsl: `SimpleShot(backbone)` / `PrototypicalNetworks(backbone)`, then per episode "
        "`process_support_set` and `model(query_images)` under `torch.no_grad()`, features recomputed "
        "per episode as its `evaluate` does; the pool is normalised once beforehand (untimed, in its "
        "favour), it computes accuracy only.",
        "- A random-init backbone (timing does not depend on the weights); the same seeded weights, "
        "episode list and one 8-image warm-up forward pass for all three. ProtoNet accuracies agree "
        "(same classifier); easyfsl's SimpleShot uses cosine to normalised prototypes without centring.",
        "",
        "### Prediction on files",
        "",
        f"{n_files} PNG files ({size} px, the novel test images cycled), batches of {PREDICT_BATCH}, "
        "ProtoNet on the random-init backbone.",
        "",
        "| what | seconds | images/s |",
        "|---|---:|---:|",
        *(
            f"| {label} | {predict[key]:.3f} | {n_files / predict[key]:.0f} |"
            for key, label in (
                ("read", "reading the files alone (`load_inputs`: MONAI reader, resize, channels)"),
                ("forward", "bare backbone forward on the decoded images"),
                ("classifier", "classifier on the decoded images (`predict_proba`)"),
                ("files", "**`fewshot-med predict` on the files** (read + classify + table)"),
            )
        ),
        "",
        f"- (predict on files - reading) / bare forward = "
        f"**{metrics['speed.predict.overhead_ratio']:.2f}**: what classifying costs beyond reading, "
        f"relative to the forward pass alone. Medians of {sizes.repeats} timing(s), after one untimed "
        "warm-up batch; the probabilities of both paths are checked to agree.",
        "",
        *streaming.markdown(streamed, BATCH_SIZE, sizes.pretrain_steps),
        "### Peak memory",
        "",
        "| measurement (each in a fresh child process) | peak resident memory (GiB) |",
        "|---|---:|",
        *(
            f"| {_MEMORY_ROWS[kind]} | {result['peak_rss_gib']:.2f} |"
            for kind, result in measured.results.items()
        ),
        "",
        "- `ru_maxrss` of a child forked from a forkserver that imported torch, timm and fewshot-med; "
        "every row includes the libraries and the data (first row). The bare and fewshot-med "
        "pretraining rows ran alone, with the steps above; their images/s: "
        f"{metrics['speed.pretrain.alone.bare_images_per_s']:.0f} and "
        f"{metrics['speed.pretrain.alone.ours_images_per_s']:.0f}.",
        "",
        "### MLflow overhead",
        "",
        "| what | tracking off (s) | tracking on (s) | on / off |",
        "|---|---:|---:|---:|",
        f"| short pretraining ({sizes.tracking_epochs} epochs x {sizes.tracking_steps} steps + validation), "
        f"whole run | {off['seconds']:.2f} | {on['seconds']:.2f} "
        f"| {metrics['speed.tracking.pretrain.ratio']:.3f} |",
        f"| the same, training call only | {off['train_seconds']:.2f} | {on['train_seconds']:.2f} "
        f"| {metrics['speed.tracking.pretrain.train_ratio']:.3f} |",
    ]
    if "pipeline.on" in measured.results:
        lines.append(
            f"| quickstart pipeline, end to end | {metrics['speed.tracking.pipeline.off_s']:.1f} "
            f"| {metrics['speed.tracking.pipeline.on_s']:.1f} "
            f"| {metrics['speed.tracking.pipeline.ratio']:.3f} |"
        )
    lines += [
        "",
        "- On: inside `pipeline_run` + `stage_run` on a SQLite store in a temporary folder, epoch metrics "
        "through `log_metrics=tracking.stage_metrics_logger('pretrain')`; off: `tracking.enabled=false`, "
        "`log_metrics=None`. Whole run = opening the runs (params, config) + training + closing.",
        f"- Creating the SQLite store (schema migrations, once per store) took {on['store_seconds']:.1f} s, "
        "not counted above.",
    ]
    if "pipeline.on" in measured.results:
        lines.append(
            "- Pipeline: `run_stages(load_config('configs/quickstart.yaml', ['tracking.enabled=…']))`; "
            "tracked, it also logs models and registers the classifier (skipped untracked)."
        )
    else:
        lines.append("- The quickstart pipeline on/off is measured in full mode only.")
    lines.append("")
    return SuiteReport(
        markdown="\n".join(lines), metrics=metrics, record=record, tables={"speed.csv": _csv(metrics)}
    )


def _csv(metrics: dict[str, float]) -> str:
    """``metric,value`` rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["metric", "value"])
    writer.writerows((key, f"{value:.6g}") for key, value in metrics.items())
    return buffer.getvalue()
