"""`clipdex index export`: serve a store's vectors from Milvus (many machines, replicas).

The collection holds `id` (the store's image id, primary key), `vector` (the unit vector,
inner-product metric, so scores are the same cosines as FAISS's), `sha256` and the first path.
Rows are upserted, so a re-export after more images were merged is idempotent. For very large
stores, `write_bulk_parquet` writes the same rows as Parquet files for Milvus's bulk import.
Note: milvus-lite accepts IVF_PQ and DISKANN but searches them brute force; only a real Milvus
server shows their recall.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from indexer.atomic import publish
from indexer.errors import ClipdexError
from indexer.store import Store, StoredImage
from indexer.types import FloatArray, IdArray

log = logging.getLogger(__name__)

# Build and search parameters per Milvus index type (the FAISS-family ones, inner product).
INDEX_PARAMS: dict[str, dict[str, Any]] = {
    "FLAT": {}, "HNSW": {"M": 32, "efConstruction": 200}, "IVF_FLAT": {"nlist": 1024},
    "IVF_PQ": {"nlist": 1024, "m": 64, "nbits": 8}, "DISKANN": {},
}
SEARCH_PARAMS: dict[str, dict[str, Any]] = {
    "FLAT": {}, "HNSW": {"ef": 256}, "IVF_FLAT": {"nprobe": 64}, "IVF_PQ": {"nprobe": 64},
    "DISKANN": {"search_list": 100},
}
PATH_BYTES = 4096  # VARCHAR limit for the path column; the store keeps the full paths


class MilvusExportError(ClipdexError):
    """The Milvus collection cannot take this store's vectors (dimension, metric, server)."""


@dataclass(frozen=True)
class MilvusTarget:
    uri: str  # http://host:19530 for a server; a local file path for milvus-lite
    collection: str = "images"
    index_type: str = "HNSW"
    index_params: dict[str, Any] = field(default_factory=dict)  # overrides INDEX_PARAMS
    token: str = ""
    replace: bool = False  # drop an existing collection first
    batch_rows: int = 2000

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_PARAMS:
            raise ValueError(f"index_type must be one of {sorted(INDEX_PARAMS)}")
        if self.batch_rows < 1:
            raise ValueError("batch_rows must be >= 1")


@dataclass
class ExportSummary:
    rows: int = 0
    seconds: float = 0.0


def connect(target: MilvusTarget) -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError as err:
        raise MilvusExportError("Milvus export needs the scale extra: "
                                "pip install 'clipdex[scale]'") from err
    return MilvusClient(uri=target.uri, token=target.token)


def export_store(store: Store, target: MilvusTarget,
                 on_progress: Callable[[ExportSummary], None] | None = None) -> ExportSummary:
    """Upsert every stored vector into the collection, then load it for search."""
    t0 = time.perf_counter()
    client = connect(target)
    try:
        _ensure_collection(client, target, store.identity().dim)
        summary = ExportSummary()
        for rows in _rows(store, target.batch_rows):
            client.upsert(target.collection, rows)
            summary.rows += len(rows)
            if on_progress:
                on_progress(summary)
        client.flush(target.collection)
        client.load_collection(target.collection)
        summary.seconds = time.perf_counter() - t0
        return summary
    finally:
        client.close()


def _ensure_collection(client: Any, target: MilvusTarget, dim: int) -> None:
    from pymilvus import DataType, MilvusClient

    name = target.collection
    if client.has_collection(name):
        if not target.replace:
            _check_existing(client, name, dim)
            return
        client.drop_collection(name)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("sha256", DataType.VARCHAR, max_length=64)
    schema.add_field("path", DataType.VARCHAR, max_length=PATH_BYTES)
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type=target.index_type, metric_type="IP",
                     params={**INDEX_PARAMS[target.index_type], **target.index_params})
    client.create_collection(name, schema=schema, index_params=params)


def _check_existing(client: Any, name: str, dim: int) -> None:
    fields = {f["name"]: f for f in client.describe_collection(name)["fields"]}
    have = int(fields.get("vector", {}).get("params", {}).get("dim", -1))
    if have != dim:
        raise MilvusExportError(f"collection {name!r} has vector dim {have}, the store {dim}; "
                                "use another collection or --replace")
    metric = client.describe_index(name, "vector").get("metric_type")
    if metric != "IP":
        raise MilvusExportError(f"collection {name!r} uses metric {metric}, clipdex needs IP")


def _rows(store: Store, chunk: int) -> Iterator[list[dict[str, Any]]]:
    for ids, vecs in store.iter_vectors(chunk):
        rows = []
        for image_id, vec in zip(ids.tolist(), vecs, strict=True):
            img = store.image_by_id(image_id)
            if img is None:  # dropped between the two reads; the next export catches up
                continue
            rows.append({"id": image_id, "vector": vec.tolist(), "sha256": img.sha256,
                         "path": _first_path(img)})
        yield rows


def milvus_search(client: Any, target: MilvusTarget, queries: FloatArray, k: int,
                  params: dict[str, Any] | None = None) -> tuple[FloatArray, IdArray]:
    """Top-k (scores, ids) from Milvus, shaped like FAISS's answer (-1 ids pad short rows)."""
    res = client.search(target.collection, data=[q.tolist() for q in queries], limit=k,
                        search_params={"metric_type": "IP",
                                       "params": params or SEARCH_PARAMS[target.index_type]})
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for i, hits in enumerate(res):
        for j, hit in enumerate(hits):
            scores[i, j], ids[i, j] = hit["distance"], hit["id"]
    return scores, ids


def write_bulk_parquet(store: Store, out_dir: str, rows_per_file: int = 1_000_000) -> list[str]:
    """The collection's rows as Parquet files for Milvus bulk import (upload, then import)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for n, (ids, vecs) in enumerate(store.iter_vectors(rows_per_file)):
        images = [store.image_by_id(i) for i in ids.tolist()]
        keep = [i for i, img in enumerate(images) if img is not None]
        offsets = np.arange(0, (len(keep) + 1) * vecs.shape[1], vecs.shape[1], dtype=np.int32)
        table = pa.table({
            "id": pa.array(ids[keep], pa.int64()),
            "vector": pa.ListArray.from_arrays(pa.array(offsets), pa.array(vecs[keep].ravel())),
            "sha256": [images[i].sha256 for i in keep],  # type: ignore[union-attr]
            "path": [_first_path(images[i]) for i in keep],
        })
        target = os.path.join(out_dir, f"part-{n:05d}.parquet")

        def write(tmp: str, t: pa.Table = table) -> None:
            pq.write_table(t, tmp)
        publish(target, write)
        written.append(target)
    return written


def _first_path(img: StoredImage | None) -> str:
    path = img.paths[0] if img and img.paths else ""
    return path.encode()[:PATH_BYTES].decode(errors="ignore")
