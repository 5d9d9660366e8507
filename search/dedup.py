"""Collection-wide near-duplicate groups: a thresholded similarity graph + union-find."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from indexer.store import Store

from .index import VectorIndex

# Cosine similarity above which two images count as near-duplicates by default. See README
# ("Choosing the dedup threshold") and benchmarks/neardup_eval.py for how it was chosen.
DEFAULT_THRESHOLD = 0.95


@dataclass(frozen=True)
class Member:
    id: int
    sha256: str
    paths: tuple[str, ...]
    score: float  # similarity to the group's representative (1.0 for the representative)


@dataclass(frozen=True)
class DupGroup:
    members: list[Member]

    @property
    def representative(self) -> Member:
        return self.members[0]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(x, x) != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        self.parent.setdefault(a, a)
        self.parent.setdefault(b, b)
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the oldest id stays the root


def near_duplicate_groups(store: Store, index: VectorIndex, threshold: float = DEFAULT_THRESHOLD,
                          chunk: int = 1024) -> list[DupGroup]:
    """Groups of two or more images linked by similarity >= threshold, largest first."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError("threshold is a cosine similarity in [-1, 1]")
    uf = _UnionFind()
    for ids, vecs in store.iter_vectors(chunk):
        for qid, (_, nbr) in zip(ids, index.range_search(vecs, threshold), strict=True):
            for other in nbr:
                if other >= 0 and other != qid:
                    uf.union(int(qid), int(other))
    groups: dict[int, list[int]] = {}
    for node in list(uf.parent):
        groups.setdefault(uf.find(node), []).append(node)
    out = [_group(store, root, members) for root, members in groups.items() if len(members) > 1]
    out.sort(key=lambda g: (-len(g.members), g.representative.id))
    return out


def _group(store: Store, root: int, members: list[int]) -> DupGroup:
    rep = store.vector(root)
    rows = []
    for m in sorted(set(members)):
        img = store.image_by_id(m)
        vec = store.vector(m)
        if img is None or vec is None or rep is None:
            continue
        rows.append(Member(m, img.sha256, img.paths, float(np.dot(rep, vec))))
    rows.sort(key=lambda r: (r.id != root, -r.score, r.id))
    return DupGroup(rows)
