"""Index at scale from shards: IVF trained once, shards added in parallel and merged on disk;
and the Milvus export round trip against milvus-lite (a real server with CLIPDEX_MILVUS_URI)."""

import os

import faiss
import numpy as np
import pytest

from indexer.errors import IndexError_
from indexer.store import Store
from search.index import build_index, open_index, read_pointer
from search.ingest import merge_shards
from search.milvus_export import (
    MilvusExportError,
    MilvusTarget,
    connect,
    export_store,
    milvus_search,
    write_bulk_parquet,
)
from search.ondisk import OnDiskSettings, build_ondisk

from .scale_helpers import clustered_vectors, synthetic_shards

DIM = 32


@pytest.fixture(scope="module")
def sharded_store(tmp_path_factory):
    """6000 clustered vectors in 4 shards, merged into a store."""
    root = tmp_path_factory.mktemp("sharded")
    vecs = clustered_vectors(6000, DIM, seed=1)
    synthetic_shards(str(root / "emb"), vecs, 1500)
    merge_shards(str(root / "emb"), str(root / "s.clipdex"))
    return root


def _recall_at(k, truth_ids, got_ids):
    return np.mean([len(set(t[:k]) & set(g[:k])) / k for t, g in zip(truth_ids, got_ids,
                                                                        strict=True)])


@pytest.mark.parametrize(("index_type", "min_recall"), [("IVF32,Flat", 0.85), ("IVF32,PQ8", 0.4)])
def test_merged_ondisk_index_has_recall_against_a_flat_index(sharded_store, tmp_path,
                                                              index_type, min_recall):
    out = tmp_path / "ondisk"
    with Store.open(str(sharded_store / "s.clipdex")) as st:
        info = build_ondisk(str(sharded_store / "emb"), str(out), st,
                            OnDiskSettings(index_type=index_type, nprobe=8, workers=2))
        flat = build_index(st, "Flat")
        served = open_index(st)  # the store now serves the merged index
        assert read_pointer(st).file == info.file and served.info.index_type == index_type
        assert sorted(served.ids().tolist()) == sorted(flat.ids().tolist())  # store ids, once
    assert info.ntotal == 6000 and os.path.getsize(next(out.glob("lists-*.ivfdata"))) > 0
    queries = clustered_vectors(200, DIM, seed=2)
    _, truth = flat.search(queries, 10)
    _, got = served.search(queries, 10)
    assert _recall_at(10, truth, got) >= min_recall  # nprobe 8 of 32 lists, saved in the index
    served.tune(nprobe=32)  # every list: nothing was lost in the merge
    _, every = served.search(queries, 10)
    assert _recall_at(10, truth, every) >= (0.999 if index_type.endswith("Flat") else min_recall)


def test_ondisk_refuses_shards_that_do_not_cover_the_store(sharded_store, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(sharded_store / "emb", partial)
    os.unlink(sorted(partial.glob("*.parquet"))[0])
    with Store.open(str(sharded_store / "s.clipdex")) as st:
        before = read_pointer(st)
        with pytest.raises(IndexError_, match="not published"):
            build_ondisk(str(partial), str(tmp_path / "od"), st, OnDiskSettings("IVF16,Flat"))
        with pytest.raises(IndexError_, match="IVF"):
            build_ondisk(str(sharded_store / "emb"), str(tmp_path / "od2"), st,
                         OnDiskSettings("HNSW32"))
        assert read_pointer(st) == before


def test_ondisk_refuses_shards_missing_from_the_store(tmp_path):
    synthetic_shards(str(tmp_path / "a"), clustered_vectors(300, DIM, seed=3), 300)
    synthetic_shards(str(tmp_path / "b"), clustered_vectors(300, DIM, seed=4), 300, first=300)
    merge_shards(str(tmp_path / "a"), str(tmp_path / "s.clipdex"))
    with Store.open(str(tmp_path / "s.clipdex")) as st, \
            pytest.raises(IndexError_, match="ingest merge"):
        build_ondisk(str(tmp_path / "b"), str(tmp_path / "od"), st, OnDiskSettings("IVF4,Flat"))


def _faiss_truth(store_dir, queries, k):
    with Store.open(str(store_dir / "s.clipdex")) as st:
        return build_index(st, "Flat").search(queries, k)


def _round_trip(store_dir, target, queries, k=10):
    with Store.open(str(store_dir / "s.clipdex")) as st:
        summary = export_store(st, target)
    client = connect(target)
    try:
        got = milvus_search(client, target, queries, k)
        count = client.get_collection_stats(target.collection)["row_count"]
    finally:
        client.close()
    return summary, count, got


@pytest.mark.parametrize("index_type", ["FLAT", "HNSW", "IVF_FLAT"])
def test_milvus_lite_round_trip_scores_equal_faiss(sharded_store, tmp_path, index_type):
    target = MilvusTarget(str(tmp_path / "milvus.db"), "images", index_type,
                          index_params={"nlist": 16} if index_type == "IVF_FLAT" else {})
    queries = clustered_vectors(20, DIM, seed=5)
    summary, count, (scores, ids) = _round_trip(sharded_store, target, queries)
    truth_scores, truth_ids = _faiss_truth(sharded_store, queries, 10)
    assert summary.rows == count == 6000
    np.testing.assert_allclose(scores, truth_scores, atol=1e-4)
    assert (ids == truth_ids).mean() > 0.99  # equal up to ties between equal scores
    again, count, _ = _round_trip(sharded_store, target, queries)  # upsert: no duplicates
    assert again.rows == count == 6000


def test_milvus_export_refuses_a_collection_of_another_dimension(sharded_store, tmp_path):
    from pymilvus import DataType, MilvusClient

    uri = str(tmp_path / "milvus.db")
    client = MilvusClient(uri)
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=8)
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    client.create_collection("images", schema=schema, index_params=params)
    client.close()
    with Store.open(str(sharded_store / "s.clipdex")) as st, \
            pytest.raises(MilvusExportError, match="dim 8"):
        export_store(st, MilvusTarget(uri, "images", "FLAT"))


def test_bulk_import_parquet_holds_every_vector_once(sharded_store, tmp_path):
    import pyarrow.parquet as pq

    with Store.open(str(sharded_store / "s.clipdex")) as st:
        files = write_bulk_parquet(st, str(tmp_path / "bulk"), rows_per_file=2500)
        _, ids, vecs = st.snapshot()
    table = pq.read_table(files)
    assert len(files) == 3 and sorted(table.column("id").to_pylist()) == sorted(ids.tolist())
    got = np.array(table.column("vector").to_pylist(), np.float32)
    assert np.array_equal(got[np.argsort(table.column("id").to_numpy())], vecs[np.argsort(ids)])


MILVUS_URI = os.environ.get("CLIPDEX_MILVUS_URI")


@pytest.mark.skipif(not MILVUS_URI, reason="set CLIPDEX_MILVUS_URI to test a real Milvus server")
@pytest.mark.parametrize("index_type", ["FLAT", "HNSW", "IVF_FLAT", "IVF_PQ", "DISKANN"])
def test_real_milvus_server_round_trip(sharded_store, index_type):
    exact = index_type in ("FLAT", "IVF_FLAT")
    extra = {"nlist": 16} if index_type.startswith("IVF") else {}
    if index_type == "IVF_PQ":
        extra["m"] = 8
    target = MilvusTarget(MILVUS_URI or "", f"clipdex_test_{index_type.lower()}", index_type,
                          index_params=extra, token=os.environ.get("CLIPDEX_MILVUS_TOKEN", ""),
                          replace=True)
    queries = clustered_vectors(20, DIM, seed=5)
    _, count, (scores, ids) = _round_trip(sharded_store, target, queries)
    truth_scores, truth_ids = _faiss_truth(sharded_store, queries, 10)
    assert count == 6000
    if exact:
        np.testing.assert_allclose(scores, truth_scores, atol=1e-4)
    else:  # approximate on a real server: recall, not equality
        assert _recall_at(10, truth_ids, ids) >= (0.9 if index_type != "IVF_PQ" else 0.3)
    client = connect(target)
    client.drop_collection(target.collection)
    client.close()


def test_faiss_is_inner_product_on_unit_vectors():
    """The premise of 'scores equal': both sides compute the plain dot product."""
    x = clustered_vectors(5, DIM)
    index = faiss.IndexFlatIP(DIM)
    index.add(x)
    scores, _ = index.search(x[:1], 1)
    assert abs(scores[0, 0] - float(x[0] @ x[0])) < 1e-6
