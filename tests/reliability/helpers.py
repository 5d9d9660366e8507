"""Shared helpers for the reliability suite: builds, store snapshots, the clipdex subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.build import BuildSettings, BuildSummary
from indexer.embed import FakeEmbedder, ModelSpec
from indexer.store import Store
from search.app import run_build
from search.index import load_index
from tests.conftest import CLIPDEX_BIN, TINY_CONFIG

# Every reason a file may be quarantined with (README "Bad files never stop a run").
KNOWN_REASONS = frozenset({
    "unidentified", "format_not_allowed", "decompression_bomb", "too_large", "truncated",
    "corrupt", "worker_crash", "timeout", "io_error", "bad_embedding",
})
TINY_MODEL_ARGS = ("--model", "clipdex-tiny", "--pretrained", "", "--random-weights",
                   "--model-config", TINY_CONFIG, "--device", "cpu", "--quiet")


def build(store_path: str, roots: Iterable[str], embedder: FakeEmbedder | None = None,
          **settings: object) -> BuildSummary:
    """`run_build` in-process (store, then index) with real decode workers and a fake model."""
    emb = embedder or FakeEmbedder(dim=16)
    kw: dict[str, object] = {"workers": 2, "batch_size": 4, **settings}
    result = run_build(list(roots), store_path, ModelSpec(), BuildSettings(**kw),  # type: ignore[arg-type]
                       embedder=emb)
    return result.summary


@dataclass(frozen=True)
class StoreState:
    """Everything a build leaves behind that must be reproducible (no times, no generations)."""

    vectors: dict[int, np.ndarray]  # id -> stored vector
    images: dict[str, tuple[int, tuple[str, ...]]]  # sha -> (id, paths)
    paths: dict[str, str]  # path -> sha
    failures: dict[str, str]  # path -> reason
    index_ids: list[int]  # ids in the published index, in index order

    def same_as(self, other: StoreState, atol: float = 1e-5) -> list[str]:
        """Differences from `other`, as readable lines (empty when equal)."""
        diffs = [name for name in ("images", "paths", "failures")
                 if getattr(self, name) != getattr(other, name)]
        if sorted(self.vectors) != sorted(other.vectors):
            diffs.append("vector ids")
        else:
            diffs += [f"vector {i}" for i in self.vectors
                      if not np.allclose(self.vectors[i], other.vectors[i], atol=atol)]
        if sorted(self.index_ids) != sorted(other.index_ids):
            diffs.append("index ids")
        return diffs


def store_state(store_path: str) -> StoreState:
    with Store.open(store_path) as st:
        _, ids, vecs = st.snapshot()
        images = {img.sha256: (img.id, img.paths) for img in st.iter_images()}
        paths = {p: st.sha_for_path(p) or "" for p in st.iter_paths()}
        failures = {p: rec["reason"] for p, rec in st.iter_failures()}
        index_ids = load_index(st).ids().tolist()
    return StoreState(dict(zip(ids.tolist(), vecs, strict=True)), images, paths, failures,
                      index_ids)


def assert_consistent(state: StoreState) -> None:
    """The invariants every store must keep, whatever happened to the process writing it."""
    assert len(state.index_ids) == len(set(state.index_ids)), "duplicate ids in the index"
    assert sorted(state.index_ids) == sorted(state.vectors), "index and store disagree"
    assert {i for i, _ in state.images.values()} == set(state.vectors)
    for vec in state.vectors.values():
        assert np.isfinite(vec).all() and abs(float(np.linalg.norm(vec)) - 1) < 1e-3
    for path, sha in state.paths.items():
        assert path in state.images[sha][1]
    assert not set(state.paths) & set(state.failures), "a path is both indexed and failed"


def clipdex(*args: str, env: Mapping[str, str] | None = None, timeout: float = 300,
            ) -> subprocess.CompletedProcess[str]:
    """Run the installed `clipdex` command."""
    return subprocess.run([CLIPDEX_BIN, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def popen_build(roots: list[str], store: str, env: Mapping[str, str] | None = None,
                *extra: str) -> subprocess.Popen[str]:
    """Start `clipdex index build` with the tiny random-weights model, in its own session."""
    cmd = [CLIPDEX_BIN, "index", "build", *roots, "--store", store, *TINY_MODEL_ARGS,
           "--batch-size", "4", "--workers", "2", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(Path(__file__).resolve().parents[2]))
