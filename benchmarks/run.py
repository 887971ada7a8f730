"""Run benchmark suites, log them to MLflow and write their sections of ``docs/benchmarks.md``.

    python -m benchmarks.run --suite peers            # easyfsl/scikit-learn/netcal peers (bench extra)
    python -m benchmarks.run --suite speed            # throughput, evaluation time, memory, MLflow cost
    python -m benchmarks.run --suite bayes            # informative priors, BMA, selection criteria
    python -m benchmarks.run --suite robustness       # adversarial attacks, written to docs/robustness.md
    python -m benchmarks.run --suite gpu              # images/s on CUDA against bare PyTorch; skipped on CPU
    python -m benchmarks.run --suite all --quick      # smoke run of every suite (numbers mean nothing)
    python -m benchmarks.run --suite peers --from ham10000=<run id> --from pbc=<run id>
    python -m benchmarks.run --suite peers --config my_data.yaml [--from <run id>]   # any pipeline config

Each suite opens an MLflow run (experiment ``benchmarks``) tagged with the machine, package versions,
git commit and options, and logs its headline metrics, record (run ids, data and episode-list
digests), tables and figures. Its section of the output file, between ``<!-- suite:<name> -->``
markers, is replaced; other sections are kept. A suite with a machine-readable verdict (peers) also
writes it to the JSON file beside the output (``docs/benchmarks.json``), replacing the entries of the
datasets it ran and keeping the others.

Exit status: 2 when the options are refused, before any work; 1 when a suite fails; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from benchmarks.common import SuiteOptions, SuiteReport, environment, require_modules
from benchmarks.suites import bayes, gpu, peers, robustness, speed
from fewshot_med import tracking
from fewshot_med._io import check_output_parent
from fewshot_med.config import load_config
from fewshot_med.errors import FewshotMedError
from fewshot_med.tracking import names

#: Suites by name: ``run(options) -> SuiteReport`` and the peer libraries it imports.
SUITES: dict[str, tuple[Callable[[SuiteOptions], SuiteReport], tuple[str, ...]]] = {
    "peers": (peers.run, peers.REQUIRES),
    "speed": (speed.run, speed.REQUIRES),
    "bayes": (bayes.run, ()),
    "robustness": (robustness.run, ()),
    "gpu": (gpu.run, ()),
}
DOCUMENT = Path("docs/benchmarks.md")
QUICK_DOCUMENT = Path("outputs/benchmarks-quick.md")
#: Suites with a document of their own: name -> (default document, default document with --quick).
SUITE_DOCUMENTS = {"robustness": (Path("docs/robustness.md"), Path("outputs/robustness-quick.md"))}
PREAMBLE = """# Benchmarks

Every number on this page is written by `python -m benchmarks.run` (see `benchmarks/`); each section
says the command, machine, versions, seed, data and episode digests, and the MLflow run that holds
its tables and plots. Rerun a suite to replace its section.
"""


def default_document(suite: str, quick: bool) -> Path:
    """Where ``suite`` writes without ``--output``: its own document (``SUITE_DOCUMENTS``), else
    ``DOCUMENT``; under ``--quick`` the matching file in ``outputs/``."""
    return SUITE_DOCUMENTS.get(suite, (DOCUMENT, QUICK_DOCUMENT))[quick]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all", help="which suite (default: all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: minutes, meaningless numbers")
    parser.add_argument("--seed", type=int, default=0, help="seed of training, episodes and methods")
    parser.add_argument(
        "--from",
        dest="backbone_runs",
        action="append",
        default=[],
        metavar="DATASET=RUN_ID",
        help="reuse the backbone (and saved episodes) of an earlier pipeline run of that dataset\n"
        "(RUN_ID alone with a single --config)",
    )
    parser.add_argument(
        "--config",
        dest="configs",
        action="append",
        type=Path,
        default=[],
        metavar="CONFIG",
        help="peers suite: benchmark this pipeline config, named by its `name` (repeatable),\n"
        "instead of the built-in datasets",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"markdown file (default {DOCUMENT}; {QUICK_DOCUMENT} with --quick);\n"
        "verdicts go to the same path with suffix .json",
    )
    parser.add_argument(
        "--parents", action="store_true", help="create the missing parent folders of --output (else refused)"
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser.parse_args(argv)


def dataset_configs(paths: list[Path], suites: list[str]) -> dict[str, Path]:
    """``--config`` files by their config's ``name``, each validated (``load_config``).

    Raises:
        FewshotMedError: a missing or invalid file, two configs of one name, or a suite besides peers.
    """
    others = [suite for suite in suites if suite != peers.SUITE]
    if paths and others:
        raise FewshotMedError(f"--config applies to the peers suite only, not {', '.join(others)}")
    configs: dict[str, Path] = {}
    for path in paths:
        name = load_config(path).name
        if name in configs:
            raise FewshotMedError(f"--config {path}: {configs[name]} has the same name, '{name}'")
        configs[name] = path
    return configs


def backbone_runs(pairs: list[str], datasets: Collection[str]) -> dict[str, str]:
    """``["ham10000=<id>", …]`` -> ``{"ham10000": "<id>"}`` for names in ``datasets``; a bare ``<id>``
    stands for the only dataset when there is one. Raises ``FewshotMedError`` on bad input."""
    only = next(iter(datasets)) if len(datasets) == 1 else None
    runs = {}
    for pair in pairs:
        name, sep, run_id = pair.partition("=")
        if not sep and only is not None:
            name, run_id = only, pair
        if not run_id or name not in datasets:
            alone = "" if sep else "; RUN_ID alone only with a single --config"
            raise FewshotMedError(
                f"--from '{pair}' must be DATASET=RUN_ID with DATASET one of {', '.join(datasets)}{alone}"
            )
        runs[name] = run_id
    return runs


def write_verdicts(path: Path, suite: str, verdicts: Mapping[str, list[dict[str, object]]]) -> None:
    """Replace the ``suite`` entries of the datasets in ``verdicts`` in the JSON file ``path``
    (``{suite: [{"dataset": …, …}, …]}``); other datasets' entries and other suites are kept."""
    document = {}
    if path.exists():
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise FewshotMedError(f"{path}: not valid JSON ({error}); move it away to start anew") from None
    kept = [entry for entry in document.get(suite, []) if entry.get("dataset") not in verdicts]
    document[suite] = kept + [entry for entries in verdicts.values() for entry in entries]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")


#: A dataset's block inside a section (``names.dataset_block``), its name in group 1.
DATASET_BLOCK = re.compile(r"<!-- dataset:(\S+) -->.*?<!-- /dataset:\1 -->", re.DOTALL)


def write_section(path: Path, suite: str, markdown: str) -> None:
    """Replace (or append) the ``suite`` section of the markdown file ``path``. Dataset blocks of the
    old section that ``markdown`` lacks (a run on some of the datasets) are kept, each followed by the
    old section's regenerate line, so a reader sees which run they come from."""
    start, end = f"<!-- suite:{suite} -->", f"<!-- /suite:{suite} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else PREAMBLE
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    old = pattern.search(text)
    block = f"{start}\n{markdown.strip()}{_kept_blocks(old.group(0), markdown) if old else ''}\n{end}"
    text = pattern.sub(lambda _: block, text) if old else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def _kept_blocks(old_section: str, markdown: str) -> str:
    """The old section's dataset blocks that ``markdown`` does not have, with the old regenerate line."""
    rerun = {match.group(1) for match in DATASET_BLOCK.finditer(markdown)}
    kept = [match.group(0) for match in DATASET_BLOCK.finditer(old_section) if match.group(1) not in rerun]
    if not kept:
        return ""
    footer = next((line for line in old_section.splitlines() if line.startswith("*Regenerate:*")), "")
    origin = footer.replace("*Regenerate:*", "*Kept from an earlier run, not rerun by the command below:*", 1)
    return "".join(f"\n\n{block}\n\n{origin}" for block in kept)


def _footer(
    command: str, env: dict[str, str], run_id: str | None, seconds: float, options: SuiteOptions
) -> str:
    dirty = " with uncommitted changes" if env.get(names.GIT_DIRTY_TAG) == "true" else ""
    versions = ", ".join(
        f"{k.removeprefix('version.')} {v}" for k, v in env.items() if k.startswith("version.")
    )
    return (
        f"\n*Regenerate:* `{command}` · {seconds / 60:.1f} min on {env['processor']} "
        f"({env['cpu_cores']} cores, {env['torch_threads']} torch threads, GPU: {env['cuda']}) · "
        f"seed {options.seed} · commit `{env.get(names.GIT_COMMIT_TAG, 'unknown')[:10]}`{dirty} · "
        f"MLflow run `{run_id}` "
        f"· Python {env['python']}, {versions}.\n"
    )


def run_suite(name: str, options: SuiteOptions, output: Path, command: str) -> SuiteReport:
    """Run one suite inside its MLflow run, log what it returns and write its section to ``output``."""
    versions = tracking.version_tags()
    commit = {key: versions[key] for key in (names.GIT_COMMIT_TAG, names.GIT_DIRTY_TAG) if key in versions}
    env = {**environment(), **commit}
    tags = {names.SUITE_TAG: name, names.QUICK_TAG: str(options.quick).lower(), names.COMMAND_TAG: command}
    start = time.perf_counter()
    with tracking.benchmark_run(name + ("-quick" if options.quick else ""), tags=tags) as run:
        tracking.set_tags({names.env_tag(key): value for key, value in environment().items()})
        report = SUITES[name][0](options)
        seconds = time.perf_counter() - start
        tracking.log_metrics({**report.metrics, names.suite_wall_metric(name): seconds})
        tracking.set_tags({names.record_tag(key): value for key, value in report.record.items()})
        for file_name, text in report.tables.items():
            tracking.log_text_artifact(text, file_name)
        for file_name, figure in report.figures.items():
            tracking.log_figure(figure, file_name)
        section = report.markdown.rstrip() + "\n" + _footer(command, env, run.run_id, seconds, options)
        tracking.log_text_artifact(section, names.suite_artifact(name, "md"))
        if report.verdicts:
            verdicts = {name: [entry for entries in report.verdicts.values() for entry in entries]}
            tracking.log_text_artifact(
                json.dumps(verdicts, indent=2, allow_nan=False), names.suite_artifact(name, "json")
            )
    write_section(output, name, section)
    written = f"section written to {output}"
    if report.verdicts:
        write_verdicts(output.with_suffix(".json"), name, report.verdicts)
        written += f", verdicts to {output.with_suffix('.json')}"
    print(f"{name}: {seconds / 60:.1f} min; {written}; MLflow run {run.run_id}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    try:  # refuse bad options, or a missing peer library, before any work
        configs = dataset_configs(args.configs, suites)
        options = SuiteOptions(
            quick=args.quick,
            seed=args.seed,
            backbone_runs=backbone_runs(args.backbone_runs, configs or peers.DATASETS),
            threads=args.threads,
            configs=configs,
        )
        outputs = {name: args.output or default_document(name, args.quick) for name in suites}
        if args.output is not None and args.output.suffix == ".json":
            message = "name the markdown file; verdicts go beside it (.json)"
            raise FewshotMedError(f"--output {args.output}: {message}")
        for name in suites:
            require_modules(SUITES[name][1])
        for output in dict.fromkeys(outputs.values()):
            check_output_parent(output, "--output", parents=args.parents or args.output is None)
    except (FewshotMedError, ImportError) as error:
        return _refuse(error, args.debug, status=2)
    try:
        for name in suites:
            run_suite(name, options, outputs[name], command)
    except FewshotMedError as error:
        return _refuse(error, args.debug, status=1)
    except KeyboardInterrupt:
        print("interrupted: the suite's MLflow runs end KILLED with what they logged", file=sys.stderr)
        return 130
    return 0


def _refuse(error: Exception, debug: bool, status: int) -> int:
    """Print ``error`` as one line and return ``status``; with ``--debug``, raise it instead."""
    if debug:
        raise error
    print(f"error: {error}", file=sys.stderr)
    return status


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (``kill``, a scheduler's time limit) ends a suite like Ctrl-C."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
