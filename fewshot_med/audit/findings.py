"""What an audit finds: flagged rows, the registry of checks they come from, and the whole report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

ERROR = "error"
WARNING = "warning"
INFO = "info"
#: Severities, most serious first. ``error``: training on the data as it is would be wrong (a label
#: conflict, a leak, a file that cannot be read); ``warning``: look at it; ``info``: worth knowing.
SEVERITIES = (ERROR, WARNING, INFO)


@dataclass(frozen=True)
class Check:
    """One kind of finding: its report section and a one-line explanation for the report."""

    section: str
    explanation: str


FILES, DUPLICATES, LABELS, CLASSES, OOD = "Files", "Duplicates and leaks", "Labels", "Classes", "Distribution"
#: Every check name a ``Finding`` may carry, in report order.
CHECKS: dict[str, Check] = {
    "missing_file": Check(FILES, "the manifest names a file that does not exist"),
    "empty_file": Check(FILES, "the file holds 0 bytes"),
    "not_an_image": Check(FILES, "the content is no image format the suffix's reader knows"),
    "wrong_extension": Check(FILES, "the content (magic bytes) is another format than the suffix says"),
    "truncated": Check(FILES, "the file ends before the image data does"),
    "unreadable": Check(FILES, "the toolkit's reader (`read_image`) fails on the file"),
    "tiny_image": Check(FILES, "a side is below the minimum; little is left to learn from"),
    "huge_image": Check(FILES, "a side is above the maximum; decoding costs much memory and time"),
    "extreme_aspect": Check(
        FILES, "long side / short side is above the maximum; resizing to a square distorts"
    ),
    "ignored_file": Check(FILES, "a file in a class folder whose suffix no reader takes; training skips it"),
    "label_conflict": Check(DUPLICATES, "the same image under two labels: at most one label is right"),
    "split_leak": Check(DUPLICATES, "the same image in two splits: test scores would be optimistic"),
    "patient_leak": Check(
        DUPLICATES,
        "one patient in two splits, or the same image under two patient ids (patient-grouped splits "
        "cannot keep it on one side)",
    ),
    "duplicate": Check(DUPLICATES, "the same image twice in one class, split and patient: wasteful only"),
    "label_issue": Check(LABELS, "cleanlab: out-of-fold predictions make the given label unlikely"),
    "knn_disagreement": Check(LABELS, "deep k-NN: most nearest neighbours carry another label"),
    "small_class": Check(CLASSES, "too few images for K-shot episodes (K support + at least 1 query)"),
    "out_of_distribution": Check(OOD, "Mahalanobis score above the reference's own high quantile"),
}


@dataclass(frozen=True)
class Finding:
    """One flagged row of the audit.

    Attributes:
        item: the image as the user named it (the path as given, or ``<split>[<row>]`` for arrays), or
            a class name for class-level checks.
        check: a key of ``CHECKS``.
        severity: one of ``SEVERITIES``.
        detail: what was measured; never a path or a patient id (those stay in ``item``/``related_item``
            so a copy can be redacted).
        related_item: the other image of a pair (a duplicate, a neighbour), else ``""``.
    """

    item: str
    check: str
    severity: str
    detail: str
    related_item: str = ""


@dataclass(frozen=True)
class AuditReport:
    """Everything one audit found, with what it looked at.

    Attributes:
        name: the dataset's short name (folder name, manifest stem, catalogue name).
        source: the data as the user gave it.
        n_items: images listed (readable or not).
        class_names: the classes.
        features: how images were represented for the label and similarity checks.
        findings: every flagged row, check by check.
        path_items: the items (and related items) that are file paths, to redact before logging.
        digest: SHA-256 of the readable images as the toolkit loads them (``MedicalImageDataset.digest``).
        settings: thresholds and options used, for the report.
        seconds: wall time per check group.
        notes: sentences the report should show.
        not_run: checks that did not run, with the reason (``{"out_of_distribution": "needs --from"}``).
    """

    name: str
    source: str
    n_items: int
    class_names: tuple[str, ...]
    features: str
    findings: tuple[Finding, ...]
    path_items: frozenset[str] = frozenset()
    digest: str | None = None
    settings: dict[str, object] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    not_run: dict[str, str] = field(default_factory=dict)

    def errors(self) -> list[Finding]:
        """The error-severity findings (label conflicts, leaks, unusable files): what must be fixed
        before training."""
        return [finding for finding in self.findings if finding.severity == ERROR]

    def counts(self) -> dict[str, int]:
        """Findings per check, every check of ``CHECKS`` included (0 when none)."""
        found = Counter(finding.check for finding in self.findings)
        return {check: found[check] for check in CHECKS}

    def severity_counts(self) -> dict[str, int]:
        """Findings per severity."""
        found = Counter(finding.severity for finding in self.findings)
        return {severity: found[severity] for severity in SEVERITIES}
