"""Evaluation of the detector: binary metrics, per-category rates, FPR calibration, splits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

METHODS = ("lr", "knn", "hybrid")


@dataclass(frozen=True)
class Scores:
    """Binary metrics of one method at one threshold (label 1 = malicious = positive)."""

    threshold: float
    precision: float
    recall: float  # = detection rate
    f1: float
    roc_auc: float  # nan when the evaluated set has one label only
    fpr: float
    tp: int
    fp: int
    tn: int
    fn: int


@dataclass(frozen=True)
class CategoryRate:
    """Share of a category's images flagged by each method (detection rate or FPR)."""

    category: str
    label: int
    n: int
    flagged: dict[str, float]


@dataclass(frozen=True)
class EvalReport:
    n: int
    methods: dict[str, Scores]
    categories: list[CategoryRate]


def binary_scores(y: npt.ArrayLike, score: npt.ArrayLike, threshold: float) -> Scores:
    yt = np.asarray(y, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    pred = s >= threshold
    tp, fp = int(np.sum(pred & yt)), int(np.sum(pred & ~yt))
    fn, tn = int(np.sum(~pred & yt)), int(np.sum(~pred & ~yt))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall) if tp else 0.0
    return Scores(threshold, precision, recall, f1, roc_auc(yt, s), _ratio(fp, fp + tn),
                  tp, fp, tn, fn)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def roc_auc(y: npt.ArrayLike, score: npt.ArrayLike) -> float:
    yt = np.asarray(y, dtype=bool)
    if yt.all() or not yt.any():
        return math.nan
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(yt, np.asarray(score, np.float64)))


def evaluate(y: Sequence[int], categories: Sequence[str | None],
             scored: dict[str, tuple[npt.ArrayLike, float]]) -> EvalReport:
    """`scored` maps a method name to (scores, threshold); all aligned with `y`."""
    yt = np.asarray(y, np.int8)
    cats = np.asarray([c or "-" for c in categories], dtype=object)
    methods = {m: binary_scores(yt, s, t) for m, (s, t) in scored.items()}
    rates = []
    for cat in sorted(set(cats.tolist()), key=lambda c: (-_label_of(cat_mask(cats, c), yt), c)):
        mask = cat_mask(cats, cat)
        flagged = {m: float(np.mean(np.asarray(s, np.float64)[mask] >= t))
                   for m, (s, t) in scored.items()}
        rates.append(CategoryRate(cat, _label_of(mask, yt), int(mask.sum()), flagged))
    return EvalReport(len(yt), methods, rates)


def cat_mask(cats: npt.NDArray[np.object_], cat: str) -> npt.NDArray[np.bool_]:
    return np.asarray(cats == cat, dtype=bool)


def _label_of(mask: npt.NDArray[np.bool_], y: npt.NDArray[np.int8]) -> int:
    """1 if most of the category is malicious (categories are normally one label)."""
    return int(np.mean(y[mask]) >= 0.5) if mask.any() else 0


def threshold_for_fpr(benign_scores: npt.ArrayLike, target_fpr: float) -> float:
    """Lowest threshold whose false-positive rate on `benign_scores` is <= target_fpr."""
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target FPR must be in [0, 1), got {target_fpr}")
    s = np.sort(np.asarray(benign_scores, np.float64))[::-1]
    if len(s) == 0:
        raise ValueError("calibration needs benign images in the validation split")
    allowed = int(math.floor(target_fpr * len(s) + 1e-9))  # false positives we may keep
    if allowed >= len(s):
        return float(s[-1])
    # strictly above the (allowed+1)-th highest benign score: ties are all excluded
    return float(np.nextafter(s[allowed], np.inf))


def split_by_identity(keys: Sequence[str], groups: Sequence[object], fraction: float,
                      seed: int) -> npt.NDArray[np.bool_]:
    """Mask of held-out items: `fraction` of each group, seeded, by identity (e.g. sha256).

    Items with the same key always land on the same side, so no image is on both.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    by_group: dict[str, set[str]] = {}
    for key, group in zip(keys, groups, strict=True):
        by_group.setdefault(str(group), set()).add(key)
    held: set[str] = set()
    for group in sorted(by_group):
        members = sorted(by_group[group])
        n_out = int(round(fraction * len(members)))
        held.update(members[i] for i in rng.permutation(len(members))[:n_out])
    return np.asarray([k in held for k in keys], dtype=bool)


# ---- presentation (lines; the caller prints) -----------------------------------------------------
def format_report(report: EvalReport) -> list[str]:
    """The side-by-side table: overall metrics, then flagged rate per category."""
    methods = list(report.methods)
    head = ["metric", *methods]
    rows = [[name, *(_fmt(getattr(report.methods[m], attr)) for m in methods)]
            for name, attr in (("threshold", "threshold"), ("precision", "precision"),
                               ("recall", "recall"), ("F1", "f1"), ("ROC-AUC", "roc_auc"),
                               ("FPR", "fpr"))]
    rows += [[f"{'detection' if c.label else 'FPR'} {c.category} (n={c.n})",
              *(_fmt(c.flagged[m]) for m in methods)] for c in report.categories]
    return table(head, rows)


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = []
    for row in [header, ["-" * w for w in widths], *rows]:
        cells = [str(row[0]).ljust(widths[0])]
        cells += [str(c).rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return lines
