"""Labels for the detector: read JSONL / folders, store them by image identity, report conflicts.

A label belongs to an image's bytes (sha256), not to a path: the same bytes under two names
carry one label. A second, different label for the same bytes is a conflict: it is reported and
the stored label is kept, unless the caller asks to overwrite.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexer.embed import sha256_file
from indexer.errors import ClipdexError
from indexer.scan import scan
from indexer.store import Store
from indexer.types import Failure, FloatArray
from indexer.vectors import is_unit_rows

LABEL_NAMES = {"malicious": 1, "benign": 0, "1": 1, "0": 0}


class LabelFileError(ClipdexError):
    """A labels file (JSONL) is malformed; carries the file and line number."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line, self.message = path, line, message


@dataclass(frozen=True)
class LabelEntry:
    """One labelled file as asked by the user (path absolute)."""

    path: str
    label: int
    category: str | None = None


@dataclass(frozen=True)
class Conflict:
    sha256: str
    path: str
    stored: dict[str, Any]
    asked: dict[str, Any]


@dataclass
class LabelReport:
    asked: int = 0
    written: int = 0  # new or changed labels stored
    unchanged: int = 0  # the same label was already stored
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why): not labelled
    not_embedded: int = 0  # labelled, but the image has no vector (failed): training skips it
    conflicts: list[Conflict] = field(default_factory=list)


def parse_label(value: object) -> int:
    """0/1 or 'benign'/'malicious' -> 0/1; anything else is a ValueError."""
    key = str(value).strip().lower() if not isinstance(value, bool) else ""
    if key not in LABEL_NAMES:
        raise ValueError(f"label must be 0/1 or benign/malicious, got {value!r}")
    return LABEL_NAMES[key]


def read_jsonl(path: str) -> list[LabelEntry]:
    """`{"path", "label", "category"?}` per line; paths are relative to the file's folder."""
    folder = os.path.dirname(os.path.abspath(path))
    out: list[LabelEntry] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                out.append(_entry(_json(path, n, line), folder, path, n))
    return out


def _json(path: str, n: int, line: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except ValueError as err:
        raise LabelFileError(path, n, f"not JSON ({err})") from err
    if not isinstance(rec, dict) or "path" not in rec or "label" not in rec:
        raise LabelFileError(path, n, 'expected {"path": ..., "label": 0|1, "category": ...}')
    return rec


def _entry(rec: dict[str, Any], folder: str, path: str, n: int) -> LabelEntry:
    try:
        label = parse_label(rec["label"])
    except ValueError as err:
        raise LabelFileError(path, n, str(err)) from err
    cat = rec.get("category")
    return LabelEntry(os.path.abspath(os.path.join(folder, str(rec["path"]))), label,
                      None if cat in (None, "") else str(cat))


def entries_for_roots(roots: Iterable[str], label: int, category: str | None
                      ) -> tuple[list[LabelEntry], list[tuple[str, str]]]:
    """Every image file under `roots` with one label; scanner failures as (path, why)."""
    entries, skipped = [], []
    for item in scan(roots):
        if isinstance(item, Failure):
            skipped.append((item.path, f"{item.reason}: {item.message}"))
        else:
            entries.append(LabelEntry(item.path, label, category))
    return entries, skipped


# ---- storing -----------------------------------------------------------------------------------
def store_labels(store: Store, entries: list[LabelEntry], source: str,
                 overwrite: bool = False) -> LabelReport:
    """Key each entry by its bytes' sha256 and write new labels; report conflicts."""
    report = LabelReport(asked=len(entries))
    wanted: dict[str, tuple[LabelEntry, dict[str, Any]]] = {}
    for entry in entries:
        sha = _sha_of(store, entry.path, report)
        if sha is not None:
            _merge(wanted, sha, entry, _record(entry, source), report)
    items = [(sha, rec) for sha, (entry, rec) in wanted.items()
             if _keep(store.label(sha), sha, entry, rec, report, overwrite)]
    store.put_labels(items)
    report.written = len(items)
    report.not_embedded = sum(1 for sha, _ in items if not store.has_image(sha))
    return report


def _sha_of(store: Store, path: str, report: LabelReport) -> str | None:
    sha = store.sha_for_path(path)
    if sha is not None:
        return sha
    try:  # a file that failed to embed is still labelled by its bytes (training counts it)
        return sha256_file(path)
    except OSError as err:
        report.unreadable.append((path, f"io_error: {err.strerror or err}"))
        return None


def _record(entry: LabelEntry, source: str) -> dict[str, Any]:
    return {"label": entry.label, "category": entry.category, "path": entry.path,
            "source": source, "at": time.time()}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same label, and no two different categories (a missing category agrees with any)."""
    cats = {a.get("category"), b.get("category")} - {None}
    return a["label"] == b["label"] and len(cats) <= 1


def _merge(wanted: dict[str, tuple[LabelEntry, dict[str, Any]]], sha: str, entry: LabelEntry,
           rec: dict[str, Any], report: LabelReport) -> None:
    """Within one import: duplicates of the same bytes must agree, else the first one wins."""
    if sha not in wanted:
        wanted[sha] = (entry, rec)
        return
    first = wanted[sha][1]
    if not _same(first, rec):
        report.conflicts.append(Conflict(sha, entry.path, _public(first), _public(rec)))
    elif first.get("category") is None and rec.get("category") is not None:
        wanted[sha] = (entry, rec)


def _keep(stored: dict[str, Any] | None, sha: str, entry: LabelEntry, rec: dict[str, Any],
          report: LabelReport, overwrite: bool) -> bool:
    if stored is None:
        return True
    if _same(stored, rec) and (rec.get("category") is None or stored.get("category")):
        report.unchanged += 1
        return False
    if _same(stored, rec) or overwrite:
        return True  # adds a category, or the user asked to replace the label
    report.conflicts.append(Conflict(sha, entry.path, _public(stored), _public(rec)))
    return False


def _public(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec.get(k) for k in ("label", "category", "path", "source")}


# ---- reading back ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Labelled:
    """Stored labels joined with stored vectors; images without a valid vector are counted."""

    shas: list[str]
    vectors: FloatArray
    labels: np.ndarray
    categories: list[str | None]
    paths: list[str]
    excluded: Counter[str]


def labelled_vectors(store: Store) -> Labelled:
    """Every labelled image with a stored, validated vector, in sha order (deterministic)."""
    dim = store.identity().dim
    shas: list[str] = []
    vecs: list[FloatArray] = []
    labels, cats, paths = [], [], []
    excluded: Counter[str] = Counter()
    for sha, rec in store.iter_labels():
        vec = _vector(store, sha, dim, excluded)
        if vec is not None:
            shas.append(sha)
            vecs.append(vec)
            labels.append(int(rec["label"]))
            cats.append(rec.get("category"))
            paths.append(_path(store, sha, rec))
    arr = np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, dim), np.float32)
    return Labelled(shas, arr, np.asarray(labels, np.int8), cats, paths, excluded)


def _vector(store: Store, sha: str, dim: int, excluded: Counter[str]) -> FloatArray | None:
    img = store.image(sha)
    vec = store.vector(img.id) if img else None
    if vec is None:
        excluded["not_embedded"] += 1  # failed or never built: never a zero vector
        return None
    if vec.shape != (dim,) or not is_unit_rows(vec[None]):
        excluded["bad_vector"] += 1
        return None
    return vec


def _path(store: Store, sha: str, rec: dict[str, Any]) -> str:
    img = store.image(sha)
    if img and rec.get("path") not in img.paths and img.paths:
        return img.paths[0]
    return str(rec.get("path") or sha)


def label_counts(store: Store) -> dict[str, int]:
    """Number of stored labels per 'label/category'."""
    c: Counter[str] = Counter()
    for _, rec in store.iter_labels():
        c[f"{'malicious' if rec['label'] == 1 else 'benign'}/{rec.get('category') or '-'}"] += 1
    return dict(sorted(c.items()))
