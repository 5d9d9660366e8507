"""`clipdex embed --engine ray` on real Ray clusters, disrupted mid-job: every image once.

Ray binds to the machine's non-loopback address even when told 127.0.0.1, so each scenario
runs in a child process inside a fresh network namespace that has only `lo` up
(`unshare -n`): no packet can leave the machine. Where namespaces are refused, the tests skip.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pyarrow.parquet as pq
import pytest

from indexer.shardfile import list_shards
from indexer.store import Store
from search.ingest import merge_shards

from .conftest import ROOT, TINY_CONFIG, scene
from .scale_helpers import loopback_namespace_prefix

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N_IMAGES = 24
SHARD_SIZE = 4


@pytest.fixture(scope="module")
def netns():
    prefix = loopback_namespace_prefix()
    if prefix is None:
        pytest.skip("cannot create a loopback-only network namespace here (`unshare -n` refused "
                    "or `ip` missing); Ray tests need one so that no traffic leaves loopback")
    return prefix


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-photos")
    for i in range(N_IMAGES):
        scene(i, (96, 72)).save(root / f"p{i:02d}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    return root


def _run_child(netns, mode, photos, out, weights, tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="cdxray-", dir="/tmp")  # short: Ray's socket paths
    cfg = {"mode": mode, "roots": [str(photos)], "out": str(out), "weights": weights,
           "model_config": TINY_CONFIG, "shard_size": SHARD_SIZE, "timeout": 300,
           "report": str(tmp_path / "report.json")}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run([*netns, sys.executable, "-m", "tests.ray_child",
                               str(tmp_path / "cfg.json")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=420)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps(report))  # timings and what Ray did; shown with `pytest -rP`
    return report


def _assert_every_image_once(out, tmp_path, photos):
    rows = [p for path, _ in list_shards(str(out))
            for p in pq.read_table(path, columns=["path"]).column("path").to_pylist()]
    assert sorted(rows) == sorted(str(p) for p in photos.iterdir())  # each file exactly once
    summary = merge_shards(str(out), str(tmp_path / "s.clipdex"))
    assert summary.embedded == N_IMAGES and sum(summary.failed.values()) == 1  # broken.jpg
    with Store.open(str(tmp_path / "s.clipdex")) as st:
        assert st.counts()["vectors"] == st.counts()["paths"] == N_IMAGES


def _finished(report):
    """The job finished on its own (Ray recovered) or through clipdex's resume."""
    run = report["first_run"]
    if "error" in run:
        run = report["resumed_run"]
    return "error" not in run


def test_ray_local_cluster_survives_a_killed_model_worker(netns, photos, tmp_path, tiny_weights):
    out = tmp_path / "emb"
    report = _run_child(netns, "kill-worker", photos, out, tiny_weights, tmp_path)
    assert report.get("disrupted"), report  # the model actor was found and killed mid-job
    assert report["shards_before_disruption"] < -(-(N_IMAGES + 1) // SHARD_SIZE)
    assert _finished(report), report
    _assert_every_image_once(out, tmp_path, photos)


def test_ray_multi_node_cluster_survives_a_removed_node(netns, photos, tmp_path, tiny_weights):
    out = tmp_path / "emb"
    report = _run_child(netns, "remove-node", photos, out, tiny_weights, tmp_path)
    assert report.get("disrupted") and report["shards_before_disruption"] < 7, report
    assert _finished(report), report
    _assert_every_image_once(out, tmp_path, photos)
