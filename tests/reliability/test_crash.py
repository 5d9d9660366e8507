"""Rows 17-19: `kill -9` at random moments and at named crash points, then a re-run: the store
reopens consistent and the result equals an uninterrupted build (same ids, vectors, paths)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.faults import CRASH_AT
from indexer.store import Store
from search.index import index_dir, load_index, read_pointer
from tests.conftest import CLIPDEX_BIN, scene
from tests.reliability.helpers import assert_consistent, clipdex, popen_build, store_state

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(CLIPDEX_BIN), reason="clipdex not installed")]

N_IMAGES = 24
# A build with the fake model, in a subprocess so that a crash point can kill it.
FAKE_BUILD = """
import sys
from indexer.build import BuildSettings
from indexer.embed import FakeEmbedder, ModelSpec
from search.app import run_build
run_build(sys.argv[2:], sys.argv[1], ModelSpec(), BuildSettings(workers=2, batch_size=4),
          embedder=FakeEmbedder(dim=16))
"""
ROOT = str(Path(__file__).resolve().parents[2])


def _collection(root: Path, start: int, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        scene(i, (64, 48)).save(root / f"img{i:03d}.png")
    if start == 0:
        shutil.copy(root / "img005.png", root / "dup-of-5.png")
        (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3)


def _store_consistent_after_kill(store: str) -> int:
    """A killed build's store reopens, and what it holds is internally consistent."""
    if not os.path.exists(os.path.join(store, "data.mdb")):
        return 0
    from search.verify import VerifyReport, verify_store

    with Store.open(store) as st:
        report = VerifyReport()
        verify_store(st, report)
        assert report.ok, report.problems
        return st.counts()["vectors"]


def test_kill_9_at_random_moments_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    _collection(root, 0, N_IMAGES)
    reference = str(tmp_path / "ref.clipdex")
    t0 = time.monotonic()
    proc = popen_build([str(root)], reference)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    full_run = time.monotonic() - t0

    store = str(tmp_path / "killed.clipdex")
    rng = np.random.default_rng(20240917)
    partial = []
    for attempt in range(3):
        proc = popen_build([str(root)], store)
        if attempt % 2:  # by time: anywhere in the run, model loading included
            try:
                proc.wait(timeout=float(rng.uniform(0.2, 1.0)) * full_run)
            except subprocess.TimeoutExpired:
                pass
        else:  # by progress: once the store holds a seeded number of vectors
            _wait_for_vectors(store, int(rng.integers(4, N_IMAGES - 4)), proc)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        partial.append(_store_consistent_after_kill(store))
    assert any(0 < n < N_IMAGES for n in partial), partial  # some kills hit mid-build
    out = clipdex("index", "build", str(root), "--store", store, *_tiny_args())
    assert out.returncode == 0, out.stderr
    killed, uninterrupted = store_state(store), store_state(reference)
    assert killed.same_as(uninterrupted) == []
    assert_consistent(killed)
    assert clipdex("index", "verify", "--store", store).returncode == 0


def _tiny_args() -> list[str]:
    from tests.reliability.helpers import TINY_MODEL_ARGS

    return [*TINY_MODEL_ARGS, "--batch-size", "4", "--workers", "2"]


def _wait_for_vectors(store: str, target: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.exists(os.path.join(store, "data.mdb")):
            try:
                with Store.open(store) as st:
                    if st.counts()["vectors"] >= target:
                        return
            except Exception:  # the manifest may not be written yet
                pass
        time.sleep(0.02)


def _fake_build(store: str, root: Path, crash_at: str | None = None
                ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, CRASH_AT: crash_at or ""}
    return subprocess.run([sys.executable, "-c", FAKE_BUILD, store, str(root)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def two_step_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A store built from a first collection, and the uninterrupted result after more files."""
    base = tmp_path_factory.mktemp("crashpoints")
    root = base / "photos"
    _collection(root, 0, 16)
    first = str(base / "first.clipdex")
    assert _fake_build(first, root).returncode == 0
    snapshot = str(base / "first-copy.clipdex")
    shutil.copytree(first, snapshot)
    _collection(root, 100, 6)
    assert _fake_build(first, root).returncode == 0
    return {"root": root, "after_first": snapshot, "final": store_state(first)}


@pytest.mark.parametrize("point", ["after_store_commit", "during_index_write",
                                   "before_index_pointer"])
def test_named_crash_point_keeps_the_old_index_and_resume_is_exact(
        tmp_path: Path, two_step_reference: dict, point: str) -> None:
    store = str(tmp_path / "s.clipdex")
    shutil.copytree(two_step_reference["after_first"], store)
    with Store.open(store) as st:
        old_pointer, old_ids = read_pointer(st), load_index(st).ids().tolist()
    crashed = _fake_build(store, two_step_reference["root"], point)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    with Store.open(store) as st:
        assert st.counts()["vectors"] == 22  # the store commits came before the crash point
        assert read_pointer(st) == old_pointer  # row 19: the previous index is intact...
        assert load_index(st).ids().tolist() == old_ids
        assert st.generation() > old_pointer.generation  # ...and seen as stale (row 18)
        leftovers = sorted(os.listdir(index_dir(st)))
    if point == "during_index_write":
        assert any(f.startswith(".tmp-") for f in leftovers)
    # Readers answer from the last committed state while the index is stale.
    out = clipdex("search", str(two_step_reference["root"] / "img101.png"), "--store", store,
                  "--json", "--k", "1")
    assert out.returncode == 0 and "img101.png" in out.stdout, out.stderr
    resumed = _fake_build(store, two_step_reference["root"])
    assert resumed.returncode == 0, resumed.stderr
    state = store_state(store)
    assert state.same_as(two_step_reference["final"]) == []
    assert_consistent(state)
    with Store.open(store) as st:
        files = os.listdir(index_dir(st))
    assert len([f for f in files if f.endswith(".faiss")]) == 1
    assert not [f for f in files if f.startswith(".tmp-")]  # the killed write's temp is gone
