"""Reports of an evaluation run for readers without MLflow: one self-contained HTML file, or markdown.

Both show the run's lineage (run id, dataset and its digest, commit, seed, config, date), the
pretraining summary, the results tables as the evaluation stage wrote them (``results.md``), the
fitted calibrator parameters, every plot with a caption, and the resolved config. The HTML file
inlines its images as base64 data URIs and its CSS, so it can be mailed or archived alone; the
markdown file links PNGs copied into a folder beside it.
"""

from __future__ import annotations

import base64
import itertools
import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote

from fewshot_med.errors import FewshotMedError
from fewshot_med.evaluation.report import PERCENT_METRICS
from fewshot_med.tracking import names
from fewshot_med.tracking.review import TRAINING_FRACTIONS, TRAINING_METRICS

if TYPE_CHECKING:
    from fewshot_med.tracking.review import RunReview

ReportFormat = Literal["html", "md"]
#: Metrics of the results tables where lower is better.
LOWER_IS_BETTER = ("ece", "adaptive_ece", "mce", "brier", "nll", "aurc")
CALIBRATION_NOTE = (
    "Parameters fitted per method and K (a temperature divides the logits; NLLs are on the episodes the "
    "calibrator was fitted on)."
)

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330;
  max-width: 1180px; margin: 2rem auto; padding: 0 1.2rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { border-bottom: 1px solid #d8dde6; padding-bottom: .2rem;
  margin-top: 2.2rem; } h3 { margin-top: 1.6rem; }
code, pre { font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: #f5f7fa; padding: .8rem; overflow-x: auto; border-radius: 4px; }
.subtitle { color: #5b6472; margin-top: 0; }
.table-wrap { overflow-x: auto; margin: .8rem 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d8dde6; padding: .25rem .55rem; text-align: left; white-space: nowrap; }
th { background: #eef1f6; } tbody tr:nth-child(even) { background: #fafbfc; }
table.lineage th { width: 12rem; } table.lineage td { white-space: normal; word-break: break-all; }
.note { color: #5b6472; font-size: 13px; }
figure { margin: 1rem 0 1.8rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eef1f6; }
figcaption { color: #3d4654; font-size: 13px; margin-top: .3rem; }
footer { color: #7a8391; font-size: 12px; margin-top: 3rem; border-top: 1px solid #d8dde6;
  padding-top: .6rem; }
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>{{ css }}</style>
</head>
<body>
<header>
<h1>{{ title }}</h1>
<p class="subtitle">{{ subtitle }}</p>
<div class="table-wrap"><table class="lineage"><tbody>
{% for name, value in lineage %}<tr><th>{{ name }}</th><td>{{ value }}</td></tr>
{% endfor %}</tbody></table></div>
</header>
<main>
{% if training %}<h2>Training</h2>
<div class="table-wrap"><table><tbody>
{% for name, value in training %}<tr><th>{{ name }}</th><td>{{ value }}</td></tr>
{% endfor %}</tbody></table></div>
{% endif %}
<h2>Results</h2>
<p class="note">{{ legend }}</p>
{{ results }}
{% if calibration %}<h2>Calibrators</h2>
<p class="note">{{ calibration_note }}</p>
<div class="table-wrap"><table>
<thead><tr><th>method</th><th>K</th><th>calibrator</th><th>parameters</th></tr></thead>
<tbody>
{% for fit in calibration %}<tr><td>{{ fit.method }}</td><td>{{ fit.k_shot }}</td>
<td>{{ fit.calibrator }}</td><td>{{ fit.params }}</td></tr>
{% endfor %}</tbody></table></div>
{% endif %}
{% if sections %}<h2>Figures</h2>
{% for section, figures in sections %}<h3>{{ section }}</h3>
{% for caption, source in figures %}<figure><img src="{{ source }}" alt="{{ caption }}">
<figcaption>{{ caption }}</figcaption></figure>
{% endfor %}{% endfor %}{% endif %}
{% if config %}<h2>Configuration</h2>
<details><summary>The resolved config of the run ({{ config_file }})</summary>
<pre>{{ config }}</pre></details>
{% endif %}
</main>
<footer>{{ footer }}</footer>
</body>
</html>
"""


def render_html(review: RunReview) -> str:
    """The report as one self-contained HTML page (inline CSS, images as base64 data URIs).

    Args:
        review: the run, as ``fewshot_med.tracking.collect_run`` gathered it.

    Returns:
        The HTML document. Text from the run is escaped (Jinja2 autoescape); the results tables are
        rendered from ``results.md`` by markdown-it with raw HTML disabled.
    """
    from jinja2 import Environment, StrictUndefined
    from markdown_it import MarkdownIt
    from markupsafe import Markup

    results = MarkdownIt("commonmark", {"html": False}).enable("table").render(review.results_markdown)
    results = results.replace("<table>", '<div class="table-wrap"><table>').replace(
        "</table>", "</table></div>"
    )
    sections = [
        (section, [(plot.caption, _data_uri(plot.path)) for plot in plots])
        for section, plots in itertools.groupby(review.plots, key=lambda plot: plot.section)
    ]
    calibration = [{**vars(fit), "params": _params(fit.params)} for fit in review.calibration]
    environment = Environment(autoescape=True, undefined=StrictUndefined, keep_trailing_newline=True)
    return environment.from_string(_TEMPLATE).render(
        title=_title(review),
        subtitle=_subtitle(review),
        css=Markup(_CSS),
        lineage=_lineage(review),
        training=_training(review),
        legend=_legend(),
        results=Markup(results),
        calibration=calibration,
        calibration_note=CALIBRATION_NOTE,
        sections=sections,
        config=_config_text(review),
        config_file=names.CONFIG,
        footer=_footer(review),
    )


def render_markdown(review: RunReview, image_dir: Path) -> str:
    """The report as markdown, with its plots copied into ``image_dir``.

    Args:
        review: the run, as ``fewshot_med.tracking.collect_run`` gathered it.
        image_dir: folder the PNGs are copied into (created if needed). Images are linked as
            ``<image_dir name>/<file>``, so the markdown file belongs in ``image_dir``'s parent.

    Returns:
        The markdown text.
    """
    image_dir = Path(image_dir)
    lines = [f"# {_title(review)}", "", _subtitle(review), "", "| | |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in _lineage(review)]
    training = _training(review)
    if training:
        lines += ["", "## Training", "", "| | |", "|---|---|"]
        lines += [f"| {name} | {_cell(value)} |" for name, value in training]
    lines += ["", "## Results", "", _legend(), "", review.results_markdown.strip()]
    if review.calibration:
        lines += ["", "## Calibrators", "", CALIBRATION_NOTE, ""]
        lines += ["| method | K | calibrator | parameters |", "|---|---|---|---|"]
        for fit in review.calibration:
            cells = [fit.method, str(fit.k_shot), fit.calibrator, _params(fit.params)]
            lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    if review.plots:
        image_dir.mkdir(parents=True, exist_ok=True)
        lines += ["", "## Figures"]
        used: set[str] = set()
        for section, plots in itertools.groupby(review.plots, key=lambda plot: plot.section):
            lines += ["", f"### {section}"]
            for plot in plots:
                name = _unique(f"{_slug(section)}-{plot.path.name}", used)
                shutil.copyfile(plot.path, image_dir / name)
                alt = plot.caption.replace("[", "(").replace("]", ")")
                lines += ["", f"![{alt}]({quote(f'{image_dir.name}/{name}')})", "", f"*{plot.caption}*"]
    config = _config_text(review)
    if config:
        lines += ["", "## Configuration", "", "```yaml", config.rstrip(), "```"]
    lines += ["", "---", "", _footer(review), ""]
    return "\n".join(lines)


def write_report(review: RunReview, out: Path, fmt: ReportFormat = "html") -> Path:
    """Write the report to ``out``.

    Args:
        review: the run, as ``fewshot_med.tracking.collect_run`` gathered it.
        out: the report file; its folder is created if needed.
        fmt: ``html``: one self-contained file; ``md``: ``out`` plus the PNGs in ``<out stem>_files/``
            beside it.

    Returns:
        ``out``.
    """
    if fmt not in ("html", "md"):
        raise FewshotMedError(f"report format '{fmt}': choose html or md")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_dir = out.parent / f"{out.stem}_files"
    text = render_html(review) if fmt == "html" else render_markdown(review, image_dir)
    out.write_text(text, encoding="utf-8")
    return out


def _title(review: RunReview) -> str:
    return f"Evaluation report: {review.config_name or review.run_name}"


def _subtitle(review: RunReview) -> str:
    parts = [f"dataset {review.dataset or 'unknown'}"]
    if review.backbone:
        parts.append(f"backbone {review.backbone}")
    if review.methods:
        parts.append("methods " + ", ".join(review.methods))
    if review.start_time:
        parts.append(review.start_time.strftime("%Y-%m-%d"))
    return " · ".join(parts)


def _lineage(review: RunReview) -> list[tuple[str, str]]:
    """``(name, value)`` rows that say exactly what was run, on what, with which code."""
    commit = review.git_commit or "unknown"
    if review.git_dirty == "true":
        commit += " (with uncommitted changes)"
    dataset = review.dataset or "unknown"
    if review.data_source and review.data_source != dataset:
        dataset += f" (source {review.data_source})"
    rows = [
        ("run id", review.run_id),
        ("run name", review.run_name),
        ("experiment", review.experiment_name),
        ("status", review.status),
        ("started (UTC)", f"{review.start_time:%Y-%m-%d %H:%M:%S}" if review.start_time else "unknown"),
        ("duration", _duration(review.duration)),
        ("config", review.config_name or "unknown"),
        ("dataset", dataset),
        ("data digest (SHA-256)", review.data_digest or "not recorded"),
        ("git commit", commit),
        ("seed", review.seed or "unknown"),
        ("backbone", review.backbone or "unknown"),
        ("stages", review.stages or "unknown"),
    ]
    if review.from_run:
        rows.append(("backbone from run", review.from_run))
    rows.append(("evaluate run", review.evaluate_run_id))
    if review.versions:
        rows.append(("versions", ", ".join(f"{name} {version}" for name, version in review.versions.items())))
    return rows


def _training(review: RunReview) -> list[tuple[str, str]]:
    rows = []
    for key, value in review.training.items():
        shown = f"{100 * value:.1f} %" if key in TRAINING_FRACTIONS else _number(value)
        rows.append((TRAINING_METRICS.get(key, key), shown))
    return rows


def _legend() -> str:
    return (
        "Cells are the mean ± the half-width of its 95% confidence interval over test episodes. "
        f"{', '.join(PERCENT_METRICS)} are in percent; the others on their own scale, where lower is "
        f"better for {', '.join(LOWER_IS_BETTER)}."
    )


def _footer(review: RunReview) -> str:
    from fewshot_med import __version__

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Generated {now} by fewshot-med {__version__} from MLflow run {review.run_id} "
        f"(experiment {review.experiment_name}); tables and figures are the run's logged artifacts."
    )


def _config_text(review: RunReview) -> str | None:
    if review.config_yaml is None or not Path(review.config_yaml).is_file():
        return None
    return Path(review.config_yaml).read_text(encoding="utf-8")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _duration(duration: timedelta | None) -> str:
    if duration is None:
        return "unknown (still running?)"
    seconds = duration.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _number(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


def _params(params: dict[str, float]) -> str:
    return ", ".join(f"{name} = {_number(value)}" for name, value in params.items())


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.").lower() or "figure"


def _unique(name: str, used: set[str]) -> str:
    stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
    candidate, index = name, 1
    while candidate in used:
        index += 1
        candidate = f"{stem}-{index}.{suffix}" if suffix else f"{stem}-{index}"
    used.add(candidate)
    return candidate
