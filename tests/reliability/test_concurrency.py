"""Row 27 and the writer lock: searches in other processes while a build writes answer from
the last committed state without blocking; a second build waits or fails clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from indexer.embed import FakeEmbedder
from indexer.errors import StoreLockedError
from indexer.store import Store
from tests.conftest import CLIPDEX_BIN, scene
from tests.reliability.helpers import assert_consistent, build, clipdex, store_state

pytestmark = pytest.mark.skipif(not os.path.exists(CLIPDEX_BIN), reason="clipdex not installed")
ROOT = str(Path(__file__).resolve().parents[2])
SLOW_BUILD = """
import sys, time
from indexer.build import BuildSettings
from indexer.embed import FakeEmbedder, ModelSpec
from search.app import run_build

import os

class Gated(FakeEmbedder):
    # Embeds the first batch, then holds the store (mid-build, lock held) until the test
    # creates the gate file: the searches are concurrent by construction, not by timing.

    calls = 0

    def embed_pixels(self, batch):
        Gated.calls += 1
        deadline = time.monotonic() + 600
        while (Gated.calls > 1 and not os.path.exists(sys.argv[2])
               and time.monotonic() < deadline):
            time.sleep(0.05)
        return super().embed_pixels(batch)

run_build(sys.argv[3:], sys.argv[1], ModelSpec(), BuildSettings(workers=1, batch_size=2),
          embedder=Gated(dim=16))
"""


@pytest.mark.slow
def test_search_during_build_and_a_second_writer(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(6):
        scene(i, (48, 36)).save(root / f"a{i}.png")
    store = str(tmp_path / "s.clipdex")
    build(store, [str(root)])
    committed_before = set(store_state(store).paths)
    for i in range(6, 40):
        scene(i, (48, 36)).save(root / f"b{i}.png")
    gate = tmp_path / "release-the-build"
    writer = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, store, str(gate), str(root)],
                              cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_locked(store, writer)
        with pytest.raises(StoreLockedError, match=r"another clipdex process \(pid \d+\)"):
            Store.create_or_open(store, FakeEmbedder(dim=16).identity)
        for query in ("a1.png", "a4.png"):
            # the writer is parked mid-build holding the lock: a search that waited on it
            # would hang here until the subprocess timeout
            out = clipdex("search", str(root / query), "--store", store, "--json", "--k", "3",
                          timeout=300)
            assert out.returncode == 0, out.stderr
            hits = json.loads(out.stdout)["hits"]
            assert hits[0]["paths"] == [str(root / query)]
        assert writer.poll() is None, "the build finished before the searches: not concurrent"
        gate.write_text("go")
        # --wait: the second writer gets the store once the first is done, and nothing is lost
        with Store.create_or_open(store, FakeEmbedder(dim=16).identity, wait=300) as st:
            assert st.counts()["paths"] == 40  # the lock came free only after the last commit
    finally:
        try:
            _, err = writer.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            writer.kill()
            _, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    state = store_state(store)
    assert committed_before <= set(state.paths) and len(state.paths) == 40
    assert_consistent(state)


def _wait_until_locked(store: str, writer: subprocess.Popen[str]) -> None:
    """Until the writer holds the lock and has committed at least one new batch."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and writer.poll() is None:
        try:
            with Store.open(store) as st:
                if st.counts()["paths"] > 6:
                    return
        except Exception:
            pass
        time.sleep(0.05)
    raise AssertionError(f"writer did not start writing: {writer.poll()}")
