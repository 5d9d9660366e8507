"""The scaling-out commands end to end, through the installed `clipdex`, on the tiny model:
embed (local engine) -> ingest merge -> index build --from --ondisk -> search -> export.
Resume, model checks and engines are covered in-process by test_shards.py / test_scale_ray.py."""

import json
import os
import subprocess

import numpy as np
import pytest

from .conftest import CLIPDEX_BIN, TINY_CONFIG, near_copy, scene
from .scale_helpers import synthetic_shards

pytestmark = pytest.mark.skipif(not os.path.exists(CLIPDEX_BIN),
                                reason="clipdex is not installed in this environment")

TINY = ["--model", "clipdex-tiny", "--pretrained", ""]


def run(*args, env, check=True):
    out = subprocess.run([CLIPDEX_BIN, *args], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **env})
    if check and out.returncode != 0:
        raise AssertionError(f"clipdex {' '.join(args)} -> {out.returncode}\n{out.stderr}")
    return out


def test_embed_merge_ondisk_search_export(tmp_path, tiny_weights):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(10):
        scene(i, (240, 180)).save(photos / f"p{i}.png")
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    query = tmp_path / "query.jpg"
    near_copy(scene(4, (240, 180))).save(query, quality=60)
    env = {"CLIPDEX_WEIGHTS": tiny_weights, "CLIPDEX_MODEL_CONFIG": TINY_CONFIG,
           "CLIPDEX_STORE": str(tmp_path / "s.clipdex")}
    emb = str(tmp_path / "emb")

    first = json.loads(run("embed", str(photos), "--out", emb, "--shard-size", "4",
                           "--workers", "2", "--json", *TINY, env=env).stdout)
    assert first["written"] == 3 and first["embedded"] == 10
    assert sum(first["failed"].values()) == 1  # corrupt.jpg, recorded in its shard

    merged = json.loads(run("ingest", "merge", emb, "--json", env=env).stdout)
    assert merged["images"] == 10 and merged["shards"] == 3

    built = json.loads(run("index", "build", "--from", emb, "--ondisk", str(tmp_path / "od"),
                           "--index-type", "IVF2,Flat", "--json", env=env).stdout)
    assert built["ntotal"] == 10 and built["file"].startswith(str(tmp_path / "od"))

    hits = json.loads(run("search", str(query), "--k", "3", "--json", env=env).stdout)
    assert hits["hits"][0]["paths"] == [str(photos / "p4.png")]

    out = run("index", "export", "--milvus", str(tmp_path / "m.db"), "--milvus-index", "FLAT",
              env=env).stdout
    assert "exported 10 vectors" in out

    other = str(tmp_path / "other")  # shards of another model are refused, store untouched
    synthetic_shards(other, np.eye(1, 32, dtype=np.float32), 1)
    refused = run("ingest", "merge", other, env=env, check=False)
    assert refused.returncode == 1 and "different model" in refused.stderr
