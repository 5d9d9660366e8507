"""Shards: planning, the local engine, resume, the Parquet files and the merge into a store.

A fake embedder and real decode processes; the Ray engine runs in test_scale_ray.py.
"""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from indexer.build import BuildSettings, Indexer
from indexer.embed import FakeEmbedder
from indexer.errors import ModelMismatchError
from indexer.shardfile import list_shards, read_manifest, shard_done
from indexer.shards import ShardSettings, plan_shards, shard_path
from indexer.store import Store
from search.ingest import merge_shards
from search.scale import run_embed

from .scale_helpers import synthetic_shards


class PoisonEmbedder(FakeEmbedder):
    """NaN for images whose top-left pixel is pure magenta (like test_build's)."""

    def embed_pixels(self, batch):
        out = super().embed_pixels(batch)
        poison = np.isclose(batch[:, :, 0, 0], [0.5, -0.5, 0.5], atol=0.01).all(axis=1)
        out[poison] = np.nan
        return out


SETTINGS = ShardSettings(files_per_shard=3, batch_size=4, decode_workers=2)


def _embed(roots, out, emb=None, settings=SETTINGS):
    emb = emb or PoisonEmbedder(dim=16)
    return run_embed([str(r) for r in roots], str(out), None, settings, "local", embedder=emb)


def _paths_in_shards(out):
    return sorted(p for path, _ in list_shards(str(out))
                  for p in pq.read_table(path, columns=["path"]).column("path").to_pylist())


def test_plan_is_deterministic_and_covers_every_file_once(image_dir):
    (image_dir / "broken-link.png").symlink_to(image_dir / "missing.png")
    a, b = plan_shards([str(image_dir)], 3), plan_shards([str(image_dir)], 3)
    assert [s.id for s in a] == [s.id for s in b] and len({s.id for s in a}) == len(a) == 3
    per_shard = [sorted([e.path for e in s.entries] + [f.path for f in s.failures]) for s in a]
    paths = [p for shard in per_shard for p in shard]
    assert sorted(paths) == paths and len(paths) == len(set(paths)) == 9
    assert [f.reason for s in a for f in s.failures] == ["io_error"]


def test_local_engine_writes_every_file_once_with_failures_and_manifest(image_dir, tmp_path):
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.new("RGB", (64, 64), (255, 0, 255)).save(image_dir / "poison.png")
    out = tmp_path / "emb"
    summary = _embed([image_dir], out)
    assert summary.shards == summary.written == 4 and summary.skipped == 0
    assert summary.embedded == 8
    assert summary.failed["bad_embedding"] == 1 and sum(summary.failed.values()) == 2
    assert _paths_in_shards(out) == sorted(str(p) for p in image_dir.rglob("*.*"))
    for path, m in list_shards(str(out)):
        table = pq.read_table(path)
        ok = table.filter(table.column("reason").is_null())
        vecs = np.array(ok.column("vector").to_pylist(), np.float32)
        assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
        assert m.model == PoisonEmbedder(dim=16).identity and m.files == table.num_rows
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


def test_rerun_skips_written_shards_and_redoes_missing_or_torn_ones(image_dir, tmp_path):
    out = tmp_path / "emb"
    _embed([image_dir], out)
    again = _embed([image_dir], out)
    assert again.skipped == 3 and again.written == 0 and again.embedded == 0
    shards = plan_shards([str(image_dir)], 3)
    os.unlink(shard_path(str(out), shards[0].id))
    with open(shard_path(str(out), shards[1].id), "r+b") as f:
        f.truncate(100)  # what a copy cut short leaves
    assert not shard_done(str(out), shards[1].id)
    third = _embed([image_dir], out)
    assert third.written == 2 and third.skipped == 1 and third.embedded == 6
    assert len(_paths_in_shards(out)) == 8


def test_merged_store_equals_a_single_machine_build(image_dir, tmp_path):
    (image_dir / "dup.png").write_bytes((image_dir / "sub" / "scene1.png").read_bytes())
    (image_dir / "broken.jpg").write_bytes(b"not an image")
    emb = FakeEmbedder(dim=16)
    _embed([image_dir], tmp_path / "emb", emb)
    merged = merge_shards(str(tmp_path / "emb"), str(tmp_path / "merged.clipdex"))
    assert merged.images == 8 and merged.embedded == 9 and dict(merged.failed) == {
        "unidentified": 1}
    with Store.create_or_open(str(tmp_path / "built.clipdex"), emb.identity) as st:
        Indexer(emb, st, BuildSettings(workers=2, batch_size=4)).build([str(image_dir)])
    with Store.open(str(tmp_path / "merged.clipdex")) as a, \
            Store.open(str(tmp_path / "built.clipdex")) as b:
        assert a.counts() == b.counts()
        assert {i.sha256: i.paths for i in a.iter_images()} == {
            i.sha256: i.paths for i in b.iter_images()}
        va = {a.image_by_id(int(i)).sha256: v for i, v in zip(*a.snapshot()[1:], strict=True)}
        vb = {b.image_by_id(int(i)).sha256: v for i, v in zip(*b.snapshot()[1:], strict=True)}
        # equal up to float summation order (the two engines batch differently)
        assert all(np.allclose(va[s], vb[s], atol=1e-6, rtol=0) for s in va)
        assert dict(a.iter_failures()).keys() == dict(b.iter_failures()).keys()
    again = merge_shards(str(tmp_path / "emb"), str(tmp_path / "merged.clipdex"))
    with Store.open(str(tmp_path / "merged.clipdex")) as a:
        assert again.images == 8 and a.counts()["paths"] == 9  # idempotent


def test_merge_refuses_shards_of_different_models(tmp_path):
    vecs = np.eye(4, 16, dtype=np.float32)
    synthetic_shards(str(tmp_path / "emb"), vecs[:2], 1)
    synthetic_shards(str(tmp_path / "emb"), vecs[2:], 1, FakeEmbedder(dim=16, seed=7).identity,
                     first=2)
    store = tmp_path / "s.clipdex"
    with pytest.raises(ModelMismatchError, match="weights_sha256"):
        merge_shards(str(tmp_path / "emb"), str(store))
    assert not store.exists()


def test_merge_refuses_shards_of_another_model_than_the_store(tmp_path):
    synthetic_shards(str(tmp_path / "emb"), np.eye(2, 16, dtype=np.float32), 1)
    with Store.create_or_open(str(tmp_path / "s.clipdex"), FakeEmbedder(16, seed=3).identity):
        pass
    with pytest.raises(ModelMismatchError):
        merge_shards(str(tmp_path / "emb"), str(tmp_path / "s.clipdex"))
    with Store.open(str(tmp_path / "s.clipdex")) as st:
        assert st.counts()["vectors"] == 0


def test_merge_revalidates_vectors_from_shard_files(tmp_path):
    vecs = np.eye(3, 16, dtype=np.float32)
    vecs[1] = np.nan  # a shard written by something else than clipdex's worker
    synthetic_shards(str(tmp_path / "emb"), vecs, 3)
    summary = merge_shards(str(tmp_path / "emb"), str(tmp_path / "s.clipdex"))
    assert summary.embedded == 2 and dict(summary.failed) == {"bad_embedding": 1}
    path, manifest = list_shards(str(tmp_path / "emb"))[0]
    assert read_manifest(path) == manifest and manifest.embedded == 3
