"""The ``fewshot-med`` command. Thin: it parses arguments and calls the library."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fewshot_med import __version__
from fewshot_med._io import check_output_parent
from fewshot_med.errors import FewshotMedError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Few-shot medical-image diagnosis by transfer, with calibrated evaluation tracked in MLflow.",
)
datasets_app = typer.Typer(no_args_is_help=True, help="Inspect datasets: catalogue, classes, roles, counts.")
app.add_typer(datasets_app, name="datasets")

console = Console(soft_wrap=True)
_state = {"debug": False}

TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri", help="Store folder or MLflow URI; default $MLFLOW_TRACKING_URI, else ./mlruns."
    ),
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
Overrides = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: section.key=value (repeatable).")
]
Parents = Annotated[
    bool, typer.Option("--parents", help="Create the output's missing parent folders (else refused).")
]


def _is_config(spec: str) -> bool:
    return spec.lower().endswith((".yaml", ".yml"))


def _version(value: bool) -> None:
    if value:
        console.print(f"fewshot-med {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    _state["debug"] = debug


@datasets_app.command("list")
def datasets_list() -> None:
    """List the built-in catalogue and whether each file is present under the data root."""
    from fewshot_med.data import CATALOG, data_root

    root = data_root()
    table = Table(title=f"data root: {root}  (set FEWSHOT_MED_DATA to change)")
    for column in ("name", "file", "present", "description"):
        table.add_column(column)
    table.add_row("demo", "(generated)", "yes", "synthetic lesions: 5 common + 3 rare classes")
    for name, entry in CATALOG.items():
        present = "yes" if (root / entry.relative_path).is_file() else "no"
        table.add_row(name, entry.relative_path, present, entry.description)
    console.print(table)


@datasets_app.command("info")
def datasets_info(
    spec: Annotated[
        str,
        typer.Argument(
            help="Catalogue name, 'demo', 'medmnist:<flag>[@size]', a .npz/.csv/folder, or a YAML config."
        ),
    ],
    image_size: Annotated[
        int | None, typer.Option(help="Resize images to this size (default: .npz keep theirs, local 64).")
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Print classes, roles and image counts per split."""
    from fewshot_med.config import load_config
    from fewshot_med.data import LoadOptions, default_roles, load_dataset

    if _is_config(spec):
        config = load_config(spec, overrides)
        dataset = load_dataset(config.data.source, config.data.load_options())
        roles = config.roles()
    else:
        dataset = load_dataset(spec, LoadOptions(image_size=image_size))
        roles = default_roles(spec)
    if roles is not None:
        roles.check(dataset.class_names, spec)
    counts = dataset.class_counts()
    height, width, channels = dataset.image_shape
    console.print(f"[bold]{dataset.name}[/bold]  source: {dataset.source}")
    console.print(f"images {height}x{width}x{channels}  digest sha256:{dataset.digest[:16]}")
    table = Table()
    for column in ("class", "role", "train", "val", "test", "total"):
        table.add_column(column, justify="left" if column in ("class", "role") else "right")
    for index, name in enumerate(dataset.class_names):
        per_split = [int(counts[split][index]) for split in ("train", "val", "test")]
        role = roles.role_of(name) if roles else "-"
        table.add_row(name, role, *map(str, per_split), str(sum(per_split)))
    totals = [int(counts[split].sum()) for split in ("train", "val", "test")]
    table.add_row("[bold]all[/bold]", "", *map(str, totals), str(sum(totals)), end_section=True)
    console.print(table)


@app.command("config")
def config_show(
    config_path: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
) -> None:
    """Validate a config and print it with every default filled in."""
    import yaml

    from fewshot_med.config import load_config

    config = load_config(config_path, overrides)
    roles = config.roles()
    resolved = config.model_dump(mode="json")
    resolved["data"]["base_classes"], resolved["data"]["novel_classes"] = list(roles.base), list(roles.novel)
    console.print(yaml.safe_dump(resolved, sort_keys=False).rstrip(), markup=False, highlight=False)


@app.command("episodes")
def episodes_sample(
    config_path: Annotated[Path, typer.Argument(help="YAML config file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON file to write.")],
    shots: Annotated[int, typer.Option(help="K, support images per class.")] = 5,
    split: Annotated[str, typer.Option(help="Split to draw from: val or test.")] = "test",
    overrides: Overrides = None,
    parents: Parents = False,
) -> None:
    """Draw the config's novel-class episodes for one K and save them as JSON for any library to reuse:
    the very lists the pipeline evaluates (test) or calibrates on (val, K capped by the split)."""
    from fewshot_med.config import load_config
    from fewshot_med.pipelines.episodes import draw_episodes
    from fewshot_med.pipelines.stages import load_data

    if split not in ("val", "test"):
        raise FewshotMedError(f"--split {split}: episodes are drawn from 'val' or 'test'")
    check_output_parent(out, "--out", parents)
    config = load_config(config_path, overrides)
    data = load_data(config)
    pools = {name: data.subset(name, "novel") for name in ("val", "test")}
    n_way = config.episodes.n_way or len(data.roles.novel)
    drawn = draw_episodes(config, pools, n_way, [shots], val=split == "val")
    episodes = drawn.test[shots] if split == "test" else drawn.val[shots]
    episodes.save(out)
    alpha = episodes.query_dirichlet_alpha
    queries = (
        f"{episodes.n_query} queries/class"
        if alpha is None
        else f"{episodes.n_query * episodes.n_way} queries split by Dirichlet({alpha:g})"
    )
    console.print(
        f"wrote {len(episodes)} {episodes.n_way}-way {episodes.k_shot}-shot episodes ({queries}) "
        f"from the {split} split to {out}"
    )


ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue interrupted training from its checkpoint.")
]
FromRun = Annotated[str, typer.Option("--from", help="MLflow run id whose backbone to start from.")]
Nproc = Annotated[
    int | None,
    typer.Option(
        "--nproc", min=1, help="Run in N processes on this machine (launches torchrun --standalone)."
    ),
]


def _launch_torchrun(nproc: int | None) -> None:
    """With ``--nproc N`` outside torchrun, replace this process by ``torchrun --standalone
    --nproc_per_node N -m fewshot_med`` with the same arguments less ``--nproc`` (signals then reach
    torchrun, which passes them to its processes)."""
    import os

    from fewshot_med.training.distributed import launched

    if nproc is None or launched():
        return
    argv, skip = [], False
    for argument in sys.argv[1:]:
        if skip or argument.startswith("--nproc="):
            skip = False
            continue
        skip = argument == "--nproc"
        if not skip:
            argv.append(argument)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *launcher, "-m", "fewshot_med", *argv])


def _run_pipeline(config_path: Path, overrides: list[str] | None, stages: tuple[str, ...], **kwargs) -> None:
    from fewshot_med.config import load_config
    from fewshot_med.pipelines.stages import rank_share
    from fewshot_med.pipelines.transfer import run_stages
    from fewshot_med.training.distributed import process_group

    config = load_config(config_path, overrides)
    with process_group(config.runtime.device):  # under torchrun; nothing for one process
        outcome = run_stages(*rank_share(config, stages), **kwargs)
    if outcome.report is not None:
        console.print(outcome.report.table(), markup=False, highlight=False)
    if outcome.selection is not None:
        console.print(outcome.selection.table(), markup=False, highlight=False)
    if outcome.run_id:
        console.print(f"MLflow run {outcome.run_id}  (browse with: fewshot-med ui)")


@app.command("run")
def run_command(
    config_path: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
    resume: ResumeOption = False,
    nproc: Nproc = None,
) -> None:
    """Run the whole pipeline: pretrain, meta-train (if enabled), evaluate every method. Under torchrun,
    every process trains and embeds a share of the evaluation images; rank 0 scores them."""
    _launch_torchrun(nproc)
    _run_pipeline(config_path, overrides, ("pretrain", "meta_train", "evaluate"), resume=resume)


@app.command("pretrain")
def pretrain_command(
    config_path: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
    resume: ResumeOption = False,
    nproc: Nproc = None,
) -> None:
    """Pretrain the backbone on the base classes and log it to MLflow (under torchrun: every process
    trains a share of each batch, rank 0 logs)."""
    _launch_torchrun(nproc)
    _run_pipeline(config_path, overrides, ("pretrain",), resume=resume)


@app.command("meta-train")
def meta_train_command(
    config_path: Annotated[Path, typer.Argument(help="YAML config file.")],
    from_run: FromRun,
    overrides: Overrides = None,
    resume: ResumeOption = False,
    nproc: Nproc = None,
) -> None:
    """Meta-train the backbone of an earlier run on base-class episodes (under torchrun: every process
    takes a share of each step's episodes, rank 0 logs)."""
    _launch_torchrun(nproc)
    _run_pipeline(config_path, overrides, ("meta_train",), from_run=from_run, resume=resume)


@app.command("evaluate")
def evaluate_command(
    config_path: Annotated[Path, typer.Argument(help="YAML config file.")],
    from_run: FromRun,
    overrides: Overrides = None,
    nproc: Nproc = None,
) -> None:
    """Evaluate the config's methods on the backbone of an earlier run (under torchrun: every process
    embeds a share of the images, rank 0 scores and logs)."""
    _launch_torchrun(nproc)
    _run_pipeline(config_path, overrides, ("evaluate",), from_run=from_run)


@app.command("robustness")
def robustness_command(
    config_path: Annotated[Path, typer.Argument(help="YAML config file.")],
    from_run: FromRun,
    overrides: Overrides = None,
    episodes: Annotated[int, typer.Option(min=1, help="Test episodes attacked per K.")] = 40,
    steps: Annotated[
        list[int] | None, typer.Option(min=1, help="PGD steps (repeatable; default 10 and 50).")
    ] = None,
    queries_per_class: Annotated[int, typer.Option(min=1, help="Queries of each class attacked.")] = 1,
    support_targets: Annotated[
        int, typer.Option(min=0, help="Queries per episode the support-set attack targets.")
    ] = 3,
) -> None:
    """White-box PGD/FGSM attacks (ART) on the config's adapted frozen-feature methods, a support-set
    attack and a gradient-masking check, on the backbone and test episodes of an earlier run."""
    from fewshot_med.config import load_config
    from fewshot_med.pipelines.robustness import run_robustness
    from fewshot_med.robustness.evaluate import RobustnessSettings

    sizes = {"episodes": episodes, "queries_per_class": queries_per_class, "support_targets": support_targets}
    settings = RobustnessSettings(**sizes, **({"steps": tuple(steps)} if steps else {}))
    outcome = run_robustness(load_config(config_path, overrides), from_run, settings)
    console.print(outcome.report.markdown(), markup=False, highlight=False)
    if outcome.run_id:
        console.print(f"MLflow run {outcome.run_id}  (browse with: fewshot-med ui)")


@app.command("select")
def select_command(
    config_path: Annotated[Path, typer.Argument(help="YAML config file.")],
    from_run: Annotated[
        str | None,
        typer.Option("--from", help="MLflow run id whose backbone to use; without it, train one first."),
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Compare model-selection criteria that need no validation set (CLML, LML, leave-one-out, training
    loss) on the config's `selection` candidates, against the test accuracy each candidate reaches."""
    stages = ("select",) if from_run else ("pretrain", "meta_train", "select")
    _run_pipeline(config_path, overrides, stages, from_run=from_run)


@app.command("reproduce")
def reproduce_command(
    run_id: Annotated[str, typer.Argument(help="MLflow id of the pipeline run to reproduce.")],
    data: Annotated[
        Path | None,
        typer.Option(help="The run's local dataset (file or folder); its digest must match the run's."),
    ] = None,
    from_backbone: Annotated[
        bool, typer.Option("--from-backbone", help="Only re-evaluate, on the run's own backbone.")
    ] = False,
    allow_other_commit: Annotated[
        bool, typer.Option("--allow-other-commit", help="Compare even if the checkout is on another commit.")
    ] = False,
    device: Annotated[str | None, typer.Option(help="Device instead of the run's runtime.device.")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Re-run a pipeline run from its logged config, seed and data, and compare every metric (tolerance 0
    on the CPU); exit 1 when some metric differs. The new run is tagged with the one it reproduces."""
    from fewshot_med.pipelines.reproduce import reproduce, rows_markdown

    outcome = reproduce(run_id, data, from_backbone, allow_other_commit, tracking_uri, device)
    console.print(rows_markdown(outcome.shown_rows()), markup=False, highlight=False)
    console.print(
        f"{len(outcome.rows)} metrics compared, all in reproduce.csv of MLflow run {outcome.run_id}",
        markup=False,
        highlight=False,
    )
    console.print(outcome.summary(), markup=False, highlight=False)
    if outcome.failures():
        raise typer.Exit(1)


@app.command("ui")
def ui_command(
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    config_path: Annotated[
        Path | None, typer.Option("--config", help="Use this config's tracking store.")
    ] = None,
) -> None:
    """Start the MLflow UI on the toolkit's store (./mlruns, or MLFLOW_TRACKING_URI). A taken port is one
    error line (exit 2); the server's exit status is this command's; stopping this command (Ctrl+C,
    SIGTERM) stops the server and its workers. A tracking server (http:// URI) serves its own UI: then
    nothing is started, and its experiments' links are printed."""
    from fewshot_med import tracking
    from fewshot_med.config import load_config
    from fewshot_med.tracking.server import remote_server

    settings = load_config(config_path).tracking if config_path else None
    server = remote_server(settings)
    url = server or f"http://{host}:{port}"
    if server is None:
        argv, env = tracking.ui_command(port, host, settings)
        tracking.check_port(host, port)
        console.print(f"MLflow UI on {url}/#/experiments?workflowType=machine_learning  (Ctrl+C to stop)")
    else:
        console.print(f"{url} is a tracking server with its own UI (nothing started); its experiments:")
    for name, page in tracking.experiment_pages(url, settings):
        console.print(f"  {name}: {page}", markup=False, highlight=False)
    if server is None:
        raise typer.Exit(tracking.serve(argv, env))


@app.command("tracking-server")
def tracking_server_command(
    folder: Annotated[
        Path, typer.Option(help="Server folder: PostgreSQL data, artifacts, auth config, credentials.env.")
    ] = Path("tracking-server"),
    port: Annotated[int, typer.Option(help="Port of the MLflow server.")] = 5000,
    host: Annotated[
        str, typer.Option(help="Interface to bind (0.0.0.0 exposes it to the network).")
    ] = "127.0.0.1",
    database_port: Annotated[
        int, typer.Option(help="PostgreSQL's port on 127.0.0.1; 0 picks a free one.")
    ] = 0,
    reviewer: Annotated[str, typer.Option(help="Name of the read-only user.")] = "reviewer",
    workers: Annotated[int, typer.Option(min=1, help="MLflow server worker processes.")] = 2,
) -> None:
    """Serve a team's MLflow tracking on PostgreSQL, with artifact serving and basic-auth: user 'admin'
    writes, the reviewer only reads; passwords are generated into FOLDER/credentials.env. Stopping this
    command (Ctrl+C, SIGTERM) stops the MLflow server and PostgreSQL."""
    from fewshot_med import tracking
    from fewshot_med.tracking.server import ADMIN_USER, CREDENTIALS_FILE, ServerSettings, run_server

    settings = ServerSettings(folder.resolve(), port, database_port, host, reviewer, workers)
    tracking.check_port(host, port)

    def ready(secrets: dict[str, str]) -> None:
        credentials = settings.folder / CREDENTIALS_FILE
        console.print(f"tracking server ready at {settings.url}  (Ctrl+C to stop)", markup=False)
        console.print(
            f"  writers:   MLFLOW_TRACKING_URI={settings.url} MLFLOW_TRACKING_USERNAME={ADMIN_USER} "
            f"MLFLOW_TRACKING_PASSWORD=<FEWSHOT_MED_ADMIN_PASSWORD in {credentials}>\n"
            f"  reviewers: MLFLOW_TRACKING_URI={settings.url} MLFLOW_TRACKING_USERNAME={reviewer} "
            f"MLFLOW_TRACKING_PASSWORD=<FEWSHOT_MED_REVIEWER_PASSWORD in {credentials}>",
            markup=False,
            highlight=False,
        )

    raise typer.Exit(run_server(settings, ready))


@app.command("report")
def report_command(
    run_id: Annotated[str, typer.Argument(help="MLflow id of a pipeline run or of its evaluate run.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="File to write; default report_<run id[:8]>.<format>.")
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="html (one self-contained file) or md (plus a _files folder of PNGs); "
            "default from --out's suffix, else html.",
        ),
    ] = None,
    tracking_uri: TrackingUri = None,
    parents: Parents = False,
) -> None:
    """Write an HTML or markdown report (lineage, tables, plots) of an evaluation run, for readers
    without MLflow."""
    import tempfile

    from fewshot_med.config import TrackingConfig
    from fewshot_med.reporting.html_report import write_report
    from fewshot_med.tracking import collect_run

    if fmt is None:
        fmt = "md" if out is not None and out.suffix.lower() in (".md", ".markdown") else "html"
    if fmt not in ("html", "md"):
        raise FewshotMedError(f"--format {fmt}: choose html or md")
    out = check_output_parent(out or Path(f"report_{run_id[:8]}.{fmt}"), "--out", parents)
    settings = TrackingConfig(tracking_uri=tracking_uri) if tracking_uri else None
    with tempfile.TemporaryDirectory(prefix="fewshot-med-report-") as folder:
        path = write_report(collect_run(run_id, Path(folder), settings), out, fmt)
    console.print(str(path), markup=False, highlight=False)


@app.command("predict")
def predict_command(
    model_uri: Annotated[
        str,
        typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/classifier or a run id."),
    ],
    paths: Annotated[
        list[str],
        typer.Argument(help="Image files, folders (recursive), globs, or a CSV manifest (column 'path')."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV file to write.")] = Path("predictions.csv"),
    batch_size: Annotated[int, typer.Option(help="Images read and classified at a time.")] = 64,
    device: Device = "auto",
    tracking_uri: TrackingUri = None,
    parents: Parents = False,
) -> None:
    """Classify image files with a logged or registered classifier: one CSV row per file with the class
    probabilities, prediction, confidence, abstain and error (a file that cannot be read gets an error
    row; the others are still classified)."""
    from fewshot_med.config import TrackingConfig
    from fewshot_med.deploy.batch import expand_inputs, outcome_counts, predict_files
    from fewshot_med.runtime import resolve_device
    from fewshot_med.tracking.models import load_classifier

    check_output_parent(out, "--out", parents)
    files = expand_inputs(paths)
    target = resolve_device(device)
    settings = TrackingConfig(tracking_uri=tracking_uri) if tracking_uri else None
    classifier = load_classifier(model_uri, settings=settings)
    table = predict_files(classifier, files, batch_size, target)
    table.to_csv(out, index=False)
    total, abstained, failed = outcome_counts(table)
    console.print(
        f"{total} images, {abstained} abstained, {failed} failed -> {out}", markup=False, highlight=False
    )
    if failed == total:
        raise FewshotMedError(f"none of the {total} images could be read; the reasons are in {out}")


@app.command("adapt")
def adapt_command(
    data: Annotated[
        Path,
        typer.Argument(help="Folder of class subfolders, or a CSV manifest path,label[,patient_id]."),
    ],
    source: Annotated[
        str, typer.Option("--from", help="Pipeline run id, or a classifier's models:/NAME@ALIAS.")
    ],
    name: Annotated[str, typer.Option(help="Registered model name.")] = "adapted-classifier",
    alias: Annotated[
        str, typer.Option(help="Alias the new version takes if it scores as well.")
    ] = "champion",
    methods: Annotated[
        str, typer.Option(help="Candidate methods, comma-separated (frozen-feature, inductive).")
    ] = "simpleshot,logreg,r2d2",
    folds: Annotated[int, typer.Option(help="Folds (capped by the smallest class).")] = 5,
    repeats: Annotated[int, typer.Option(help="Repeats with reshuffled folds.")] = 3,
    choose_by: Annotated[
        str, typer.Option("--choose-by", help="logloss, accuracy, or clml (no held-out images).")
    ] = "logloss",
    target_coverage: Annotated[
        float | None, typer.Option(help="Keep this fraction of images, abstain on the rest (default 0.9).")
    ] = None,
    target_accuracy: Annotated[
        float | None, typer.Option(help="Instead: the largest coverage reaching this accuracy.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of folds, bootstrap and methods.")] = 0,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "adapt",
    tracking_uri: TrackingUri = None,
    log_paths: Annotated[
        bool, typer.Option("--log-paths", help="Log the data path and patient ids (default: never).")
    ] = False,
    allow_conflicts: Annotated[
        bool, typer.Option("--allow-conflicts", help="Go on despite label conflicts or leakage.")
    ] = False,
    intensity: Annotated[
        list[str] | None,
        typer.Option(help="Pixel intensity setting key=value, repeatable (mode=window, center=40, ...)."),
    ] = None,
    nifti_slice: Annotated[int | None, typer.Option(help="Slice of 3D volumes (default middle).")] = None,
    device: Device = "auto",
) -> None:
    """Adapt to a hospital's own labelled images: choose a method by cross-validation, calibrate, set an
    abstention threshold, register the classifier with a model card; the last line is its model URI."""
    from fewshot_med.pipelines.adapt import AdaptSettings, adapt, intensity_from_options, summary

    if target_coverage is None and target_accuracy is None:
        target_coverage = 0.9
    settings = AdaptSettings(
        data=data,
        source=source,
        name=name,
        alias=alias,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        folds=folds,
        repeats=repeats,
        choose_by=choose_by,
        target_coverage=target_coverage,
        target_accuracy=target_accuracy,
        seed=seed,
        experiment=experiment,
        tracking_uri=tracking_uri,
        log_paths=log_paths,
        allow_conflicts=allow_conflicts,
        intensity=intensity_from_options(intensity or []),
        nifti_slice=nifti_slice,
        device=device,
    )
    outcome = adapt(settings)
    console.print(summary(outcome), markup=False, highlight=False)
    console.print(outcome.model_uri, markup=False, highlight=False)


@datasets_app.command("demo-folder")
def datasets_demo_folder(
    out: Annotated[Path, typer.Argument(help="New folder to write: one subfolder of images per class.")],
    classes: Annotated[
        str | None,
        typer.Option(help="Comma-separated demo classes; default: dermatofibroma,vascular,actinic."),
    ] = None,
    per_class: Annotated[int, typer.Option("--per-class", help="Images per class.")] = 20,
    image_size: Annotated[int, typer.Option(help="Side of the square images, in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Same seed, same files; another seed, new images.")] = 1,
    manifest: Annotated[
        bool, typer.Option("--manifest", help="Also write manifest.csv (path,label,patient_id).")
    ] = False,
    parents: Parents = False,
) -> None:
    """Write synthetic PNG and DICOM files as a hospital export would look, to try local-data commands."""
    from fewshot_med.data.demo import DEMO_NOVEL_CLASSES
    from fewshot_med.data.demo_files import write_demo_folder

    names = DEMO_NOVEL_CLASSES if classes is None else [name.strip() for name in classes.split(",")]
    check_output_parent(out, "OUT", parents)
    folder = write_demo_folder(out, names, per_class, image_size, seed, manifest=manifest)
    console.print(str(folder), markup=False, highlight=False)


@app.command("audit")
def audit_command(
    data: Annotated[
        str,
        typer.Argument(
            help="Folder of class subfolders, CSV manifest path,label[,patient_id][,split], or a dataset "
            "name (ham10000, a .npz)."
        ),
    ],
    from_run: Annotated[
        str | None,
        typer.Option(
            "--from", help="Run whose backbone gives the features (label checks, similar images, OOD)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for the report; default ./audit-<name>.")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 when any error-severity finding exists.")
    ] = False,
    shots: Annotated[
        list[int] | None,
        typer.Option("--k", help="K to check class sizes for (repeatable; default 1, 5, 10)."),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(
            help="With --from: what OOD scores refer to: a YAML config (its base classes' train split, the "
            "run's pretraining data) or a dataset; default the audited data's own train split."
        ),
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Decode images to this side (default: the backbone's, else 64).")
    ] = None,
    log_paths: Annotated[
        bool, typer.Option("--log-paths", help="Log file paths to MLflow as given (default: salted tokens).")
    ] = False,
    tracking_uri: TrackingUri = None,
    device: Device = "auto",
    parents: Parents = False,
) -> None:
    """Check data before training: unreadable or odd files, duplicates, label conflicts, split and patient
    leaks, suspected label errors, classes too small for K, and (with --from) out-of-distribution images.
    Writes report.md, report.html and flagged.csv, and logs a copy (paths as tokens) to MLflow."""
    from fewshot_med.audit import AuditSettings, audit_dataset, log_audit, summary_lines, write_report
    from fewshot_med.config import TrackingConfig

    if out is not None and out.exists() and not out.is_dir():
        raise FewshotMedError(f"--out {out}: a file of that name exists; give a folder")
    if out is not None:
        check_output_parent(out, "--out", parents)
    settings = TrackingConfig(tracking_uri=tracking_uri, log_paths=log_paths)
    options = AuditSettings(image_size=image_size, **({"shots": tuple(shots)} if shots else {}))
    report = audit_dataset(data, options, from_run, reference, tracking_settings=settings, device=device)
    folder = out or Path(f"audit-{report.name}")
    written = write_report(report, folder)
    run_id = log_audit(report, log_paths, settings, from_run)
    for line in summary_lines(report):
        console.print(line, markup=False, highlight=False)
    console.print(
        f"report: {written['report.md']} (also report.html, flagged.csv)", markup=False, highlight=False
    )
    console.print(f"MLflow run {run_id} in experiment 'audit'", markup=False, highlight=False)
    if strict and report.errors():
        raise typer.Exit(1)


@app.command("export")
def export_command(
    model_uri: Annotated[
        str,
        typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/classifier or a run id."),
    ],
    out: Annotated[Path, typer.Argument(help="New or empty folder to write the export into.")],
    fmt: Annotated[
        str, typer.Option("--format", help="monai-bundle: a MONAI bundle (metadata, config, TorchScript).")
    ] = "monai-bundle",
    tracking_uri: TrackingUri = None,
    parents: Parents = False,
) -> None:
    """Export a logged or registered classifier for another runtime: a MONAI bundle that
    `python -m monai.bundle run` runs on a folder of images, with the classifier's probabilities."""
    if fmt != "monai-bundle":
        raise FewshotMedError(f"--format {fmt}: unknown export format; choose monai-bundle")
    from fewshot_med.config import TrackingConfig
    from fewshot_med.deploy.monai_bundle import check_bundle_folder, write_bundle
    from fewshot_med.tracking.models import load_classifier, load_model_card

    check_output_parent(out, "OUT", parents)
    check_bundle_folder(out)
    settings = TrackingConfig(tracking_uri=tracking_uri) if tracking_uri else None
    classifier = load_classifier(model_uri, settings=settings)
    card = load_model_card(model_uri, settings=settings)
    bundle = write_bundle(classifier, out, source=model_uri, card=card)
    console.print(str(bundle), markup=False, highlight=False)


#: What SIGTERM stops, for the commands that serve rather than run a pipeline.
_SERVING_INTERRUPTS = {
    "ui": "stopping the MLflow server",
    "tracking-server": "stopping the MLflow and PostgreSQL servers",
}


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (``kill``, a batch scheduler's time limit) ends runs like Ctrl-C: MLflow runs are marked
    KILLED with what they logged, training checkpoints stay for ``--resume``, and the exit status is
    130 (typer's for an interrupt). A serving command says that it stops its servers instead."""
    command = next((word for word in sys.argv[1:] if not word.startswith("-")), "")
    what = _SERVING_INTERRUPTS.get(command, "MLflow runs end KILLED; continue with --resume")
    print(f"interrupted (SIGTERM): {what}", file=sys.stderr)
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: run the app; user errors become one line on stderr and a non-zero exit status."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app()
    except FewshotMedError as error:
        if _state["debug"]:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        if _state["debug"]:
            raise
        message = (str(error).strip().splitlines() or [""])[0]  # e.g. SQLAlchemy's add the SQL statement
        print(
            f"error: unexpected {type(error).__name__}: {message} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        sys.exit(1)
