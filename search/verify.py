"""`index verify`: check the store and its index against each other; `--repair` rebuilds."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from indexer.errors import IndexError_
from indexer.store import Store

from .index import DEFAULT_INDEX_TYPE, build_index, load_index, read_pointer, save_index_locked


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    checked_vectors: int = 0
    index_ntotal: int = 0
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(store: Store, report: VerifyReport) -> set[int]:
    """Store-internal invariants; returns the set of stored vector ids."""
    dim = store.identity().dim
    ids: set[int] = set()
    for chunk_ids, vecs in store.iter_vectors():
        norms = np.linalg.norm(vecs, axis=1)
        bad = ~np.isfinite(vecs).all(axis=1) | (np.abs(norms - 1) > 1e-3)
        for i in chunk_ids[bad]:
            report.problems.append(f"stored vector {int(i)} is not a finite unit vector")
        ids.update(int(i) for i in chunk_ids)
        report.checked_vectors += len(chunk_ids)
        if vecs.shape[1] != dim:
            report.problems.append(f"vectors have dimension {vecs.shape[1]}, manifest {dim}")
    image_ids = set()
    for img in store.iter_images():
        image_ids.add(img.id)
        if not img.paths:
            report.problems.append(f"image {img.sha256[:12]} has no path")
    if image_ids != ids:
        report.problems.append(f"{len(ids ^ image_ids)} ids differ between vectors and images")
    for path in store.iter_paths():
        sha = store.sha_for_path(path)
        if sha is None or store.image(sha) is None:
            report.problems.append(f"path {path} points to a missing image")
    return ids


def verify_index(store: Store, ids: set[int], report: VerifyReport) -> None:
    pointer = read_pointer(store)
    try:
        vindex = load_index(store)
    except IndexError_ as err:
        report.problems.append(str(err))
        return
    report.index_ntotal = vindex.ntotal
    if pointer and pointer.generation != store.generation():
        report.problems.append(f"index is stale: generation {pointer.generation}, "
                               f"store {store.generation()}")
    index_ids = vindex.ids()
    if len(set(index_ids.tolist())) != len(index_ids):
        report.problems.append("index holds duplicate ids")
    if set(index_ids.tolist()) != ids:
        report.problems.append(f"index and store disagree on {len(set(index_ids.tolist()) ^ ids)}"
                               " ids")
    _spot_check(store, vindex, index_ids, report)


def _spot_check(store: Store, vindex: object, index_ids: np.ndarray, report: VerifyReport,
                n: int = 64) -> None:
    """Stored vectors must come back from the index as their own nearest neighbour."""
    rng = np.random.default_rng(0)
    sample = index_ids if len(index_ids) <= n else rng.choice(index_ids, n, replace=False)
    for i in sample:
        vec = store.vector(int(i))
        if vec is None:
            continue
        scores, ids = vindex.search(vec[None], 1)  # type: ignore[attr-defined]
        if not np.isfinite(scores).all() or abs(float(scores[0, 0]) - 1.0) > 1e-3:
            report.problems.append(f"index entry for id {int(i)} does not match its stored vector")


def verify(store: Store, repair: bool = False) -> VerifyReport:
    report = VerifyReport()
    ids = verify_store(store, report)
    verify_index(store, ids, report)
    if repair and report.problems:
        pointer = read_pointer(store)
        vindex = build_index(store, pointer.wanted if pointer else DEFAULT_INDEX_TYPE)
        save_index_locked(store, vindex)  # never races a running build's publish
        report.repaired = True
    return report
