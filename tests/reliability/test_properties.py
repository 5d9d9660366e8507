"""Property tests: vector validation, and the store/index invariants under random sequences of
commits, failures, re-links and prunes (hypothesis stateful test on a real Store)."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from indexer.embed import FakeEmbedder
from indexer.store import Batch, Store
from indexer.types import Failure, ImageMeta, ScanEntry
from indexer.vectors import BAD_EMBEDDING, normalize_rows
from search.index import build_index

DIM = 8
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(0, 6), st.just(DIM)), elements=floats))
def test_normalize_rows_returns_unit_rows_or_a_reason(raw: np.ndarray) -> None:
    out, reasons = normalize_rows(raw, DIM)
    assert out.shape == raw.shape and out.dtype == np.float32 and len(reasons) == len(raw)
    for row, src, why in zip(out, raw, reasons, strict=True):
        if why is None:
            assert np.isfinite(src).all()
            assert abs(float(np.linalg.norm(row)) - 1) < 1e-3
        else:
            assert not row.any()  # refused rows are zeroed: unusable by accident


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(0, 3), st.integers(1, 12)), elements=floats))
def test_wrong_dimension_refuses_every_row(raw: np.ndarray) -> None:
    out, reasons = normalize_rows(raw, DIM + 100)
    assert len(reasons) == len(raw) and all(r and "wrong shape" in r for r in reasons)
    assert not out.any()


PATHS = [f"/r/p{i}.png" for i in range(6)]
SHAS = [f"sha{i}" for i in range(5)]
vectors = hnp.arrays(np.float32, DIM, elements=st.one_of(
    st.floats(-4, 4, width=32), st.sampled_from([0.0, np.nan, np.inf, 1e-30])))


class StoreMachine(RuleBasedStateMachine):
    """What the Indexer does to a store, in random order; the index must always agree."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="clipdex-prop-")
        self.store = Store.create_or_open(f"{self.dir}/s.clipdex", FakeEmbedder(DIM).identity)
        self.mtime = 0

    def _entry(self, path: str) -> ScanEntry:
        self.mtime += 1
        return ScanEntry(path, 10, self.mtime)

    @rule(items=st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from(SHAS), vectors),
                         max_size=4))
    def commit_embedded(self, items: list[tuple[str, str, np.ndarray]]) -> None:
        vecs, reasons = normalize_rows(np.stack([v for *_, v in items]) if items
                                       else np.zeros((0, DIM), np.float32), DIM)
        batch = Batch()
        for (path, sha, _), vec, why in zip(items, vecs, reasons, strict=True):
            entry = self._entry(path)
            if why is None:
                batch.embedded.append((entry, ImageMeta(sha, 2, 2, "PNG", 10), vec))
            else:
                batch.failures.append(Failure(path, BAD_EMBEDDING, why, 10, entry.mtime_ns))
        self.store.commit(batch)

    @rule(path=st.sampled_from(PATHS), sha=st.sampled_from(SHAS))
    def link_known_bytes(self, path: str, sha: str) -> None:
        if self.store.has_image(sha):
            self.store.commit(Batch(linked=[(self._entry(path), sha)]))

    @rule(path=st.sampled_from(PATHS), reason=st.sampled_from(["corrupt", "io_error"]))
    def fail(self, path: str, reason: str) -> None:
        self.store.commit(Batch(failures=[Failure(path, reason, "x", 10, 1)]))

    @rule(keep=st.sets(st.sampled_from(PATHS)))
    def prune(self, keep: set[str]) -> None:
        self.store.prune(keep, ["/r"])

    @invariant()
    def store_and_index_agree(self) -> None:
        _, ids, vecs = self.store.snapshot()
        images = list(self.store.iter_images())
        assert sorted(i.id for i in images) == sorted(ids.tolist())
        assert all(i.paths for i in images)  # no orphan image
        for path in self.store.iter_paths():
            img = self.store.image(self.store.sha_for_path(path) or "")
            assert img is not None and path in img.paths
        assert np.isfinite(vecs).all()
        vindex = build_index(self.store)
        index_ids = vindex.ids().tolist()
        assert sorted(index_ids) == sorted(ids.tolist()) and len(set(index_ids)) == len(ids)
        if len(ids):
            scores, found = vindex.search(vecs, 1)
            assert (found[:, 0] == ids).all() or np.allclose(scores[:, 0], 1, atol=1e-4)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=40, stateful_step_count=15, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
