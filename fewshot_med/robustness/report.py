"""Tables, CSV and MLflow metrics of the attack results (``fewshot_med.robustness.evaluate``)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

from fewshot_med.robustness.evaluate import (
    COLLAPSE_LIMIT,
    AttackResults,
    MaskingCheck,
    RobustnessSettings,
    SupportResults,
    epsilon_label,
)


@dataclass
class RobustnessReport:
    """Everything the attacks measured on one dataset: per (method, K) the clean and attacked rows,
    the support-set attack, and the gradient-masking checks."""

    settings: RobustnessSettings
    queries: list[AttackResults] = field(default_factory=list)
    support: list[SupportResults] = field(default_factory=list)
    checks: list[MaskingCheck] = field(default_factory=list)
    not_covered: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        """Query-attack tables per K, the support-set attack, the check's verdict, what is not covered."""
        lines: list[str] = []
        for k in sorted({r.k_shot for r in self.queries}):
            lines += [f"#### {k}-shot: accuracy and pooled ECE under attack (% , 95% CI over episodes)", ""]
            lines += _query_table([r for r in self.queries if r.k_shot == k])
        if self.support:
            lines += ["#### Support-set attack: success rate (%, 95% CI over episodes)", ""]
            lines += _support_table(self.support)
        if self.checks:
            lines += ["#### Gradient-masking check", "", _verdict(self.checks, self.settings), ""]
            lines += _check_table(self.checks, self.settings)
        if self.not_covered:
            covered = ", ".join(f"{label} ({why})" for label, why in self.not_covered.items())
            lines += [f"Not attacked: {covered}.", ""]
        return "\n".join(lines).rstrip() + "\n"

    def csv(self) -> str:
        """One row per method, K and attack: accuracy and pooled ECE with their half-widths."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(
            ["method", "k_shot", "attack", "episodes", "accuracy", "accuracy_ci95", "ece", "ece_ci95"]
        )
        for r in self.queries:
            summary = r.summary()
            writer.writerow(
                [r.method, r.k_shot, r.name, len(r.labels), *summary["accuracy"], *summary["ece_pooled"]]
            )
        for s in self.support:
            mean, half = s.summary()
            writer.writerow(
                [
                    s.method,
                    s.k_shot,
                    f"support pgd{s.steps} {epsilon_label(s.epsilon)}",
                    len(s.success),
                    mean,
                    half,
                    "",
                    "",
                ]
            )
        return out.getvalue()


def _cell(value: tuple[float, float], scale: float = 100.0, digits: int = 1) -> str:
    mean, half = value
    return f"{mean * scale:.{digits}f} ± {half * scale:.{digits}f}"


def _query_table(results: Sequence[AttackResults]) -> list[str]:
    methods = list(dict.fromkeys(r.method for r in results))
    attacks = list(dict.fromkeys(r.name for r in results))
    by = {(r.method, r.name): r.summary() for r in results}
    header = "| attack | " + " | ".join(f"{m} acc | {m} ECE" for m in methods) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(methods)]
    for attack in attacks:
        cells = [
            f"{_cell(by[m, attack]['accuracy'])} | {_cell(by[m, attack]['ece_pooled'], digits=3, scale=1)}"
            for m in methods
        ]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _support_table(results: Sequence[SupportResults]) -> list[str]:
    epsilons = list(dict.fromkeys(r.epsilon for r in results))
    header = (
        "| method | K | " + " | ".join(f"pgd{results[0].steps} {epsilon_label(e)}" for e in epsilons) + " |"
    )
    lines = [header, "|---|---:|" + "---:|" * len(epsilons)]
    for method, k in dict.fromkeys((r.method, r.k_shot) for r in results):
        row = {r.epsilon: r for r in results if (r.method, r.k_shot) == (method, k)}
        lines.append(f"| {method} | {k} | " + " | ".join(_cell(row[e].summary()) for e in epsilons) + " |")
    return [*lines, ""]


def _verdict(checks: Sequence[MaskingCheck], settings: RobustnessSettings) -> str:
    failed = [f"{c.method} {c.k_shot}-shot" for c in checks if not c.passed]
    rule = (
        f"robust accuracy under PGD at {epsilon_label(settings.check_epsilon)} "
        f"below {COLLAPSE_LIMIT:.0%}, and "
        f"PGD-{max(settings.steps)} never above PGD-{min(settings.steps)} beyond the paired 95% CI"
    )
    if not failed:
        return f"**Passed** for every method and K ({rule}): no sign of gradient masking."
    return f"**Failed** for {', '.join(failed)} ({rule}): those robust accuracies may overstate robustness."


def _check_table(checks: Sequence[MaskingCheck], settings: RobustnessSettings) -> list[str]:
    gaps = [
        f"PGD-{max(settings.steps)} minus PGD-{min(settings.steps)} at {epsilon_label(e)}"
        for e, _, _ in checks[0].steps_gap
    ]
    header = (
        f"| method | K | accuracy at {epsilon_label(settings.check_epsilon)} | "
        + " | ".join(gaps)
        + " | passed |"
    )
    lines = [header, "|---|---:|---:|" + "---:|" * len(gaps) + "---|"]
    for c in checks:
        cells = [_cell((mean, half)) for _, mean, half in c.steps_gap]
        lines.append(
            f"| {c.method} | {c.k_shot} | {_cell(c.collapse)} | "
            + " | ".join(cells)
            + f" | {'yes' if c.passed else 'no'} |"
        )
    return [*lines, ""]
