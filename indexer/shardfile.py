"""One shard's results as one Parquet file, written atomically, with the model manifest inside.

Columns: path, size, mtime_ns, sha256, width, height, format, animated, warnings, reason,
message, vector (fixed-size list of float32; null for failed files). The schema metadata key
`clipdex.shard` holds a JSON manifest: shard id, counts and the full `ModelIdentity`, so shards
from different models can be refused when merged. Needs pyarrow (the `scale` extra).
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import publish
from .embed import ModelIdentity
from .errors import ClipdexError, ModelMismatchError
from .shards import ShardRows, shard_path
from .types import Failure, FloatArray, ImageMeta, ScanEntry
from .vectors import BAD_EMBEDDING, normalize_rows

FORMAT_VERSION = 1
META_KEY = b"clipdex.shard"


class ShardFileError(ClipdexError):
    """A shard file is missing its manifest, unreadable, or of an unknown format."""


@dataclass(frozen=True)
class ShardManifest:
    shard_id: str
    model: ModelIdentity
    files: int
    embedded: int
    failed: int
    created_at: float
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps({"shard_id": self.shard_id, "model": self.model.to_dict(),
                           "files": self.files, "embedded": self.embedded, "failed": self.failed,
                           "created_at": self.created_at, "format": self.format})

    @classmethod
    def from_json(cls, text: str | bytes) -> ShardManifest:
        d = json.loads(text)
        if d.get("format") != FORMAT_VERSION:
            raise ShardFileError(f"unknown shard format {d.get('format')!r}")
        return cls(d["shard_id"], ModelIdentity.from_dict(d["model"]), d["files"],
                   d["embedded"], d["failed"], d["created_at"])


def _schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
        ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("format", pa.string()), ("animated", pa.bool_()), ("warnings", pa.list_(pa.string())),
        ("reason", pa.string()), ("message", pa.string()),
        ("vector", pa.list_(pa.float32(), dim)),
    ])


def _table(rows: ShardRows) -> pa.Table:
    ok, bad = rows.entries, rows.failures
    vecs = rows.matrix().reshape(-1)
    flat = pa.array(np.concatenate([vecs, np.zeros(len(bad) * rows.dim, np.float32)]))
    mask = pa.array([False] * len(ok) + [True] * len(bad))
    vector = pa.FixedSizeListArray.from_arrays(flat, rows.dim, mask=mask)
    cols = {
        "path": [e.path for e in ok] + [f.path for f in bad],
        "size": [e.size for e in ok] + [f.size for f in bad],
        "mtime_ns": [e.mtime_ns for e in ok] + [f.mtime_ns for f in bad],
        "sha256": [m.sha256 for m in rows.metas] + [f.sha256 for f in bad],
        "width": [m.width for m in rows.metas] + [0] * len(bad),
        "height": [m.height for m in rows.metas] + [0] * len(bad),
        "format": [m.format for m in rows.metas] + [""] * len(bad),
        "animated": [m.animated for m in rows.metas] + [False] * len(bad),
        "warnings": [list(m.warnings) for m in rows.metas] + [[] for _ in bad],
        "reason": [None] * len(ok) + [f.reason for f in bad],
        "message": [""] * len(ok) + [f.message for f in bad],
    }
    schema = _schema(rows.dim)
    arrays = [pa.array(cols[f.name], f.type) for f in schema if f.name != "vector"]
    return pa.Table.from_arrays([*arrays, vector], schema=schema)


def write_shard(out_dir: str, sid: str, rows: ShardRows, identity: ModelIdentity
                ) -> ShardManifest:
    """Write the shard's Parquet file so that it appears whole or not at all."""
    if rows.dim != identity.dim:
        raise ShardFileError(f"shard {sid}: vectors of dim {rows.dim}, model has {identity.dim}")
    manifest = ShardManifest(sid, identity, len(rows.entries) + len(rows.failures),
                             len(rows.entries), len(rows.failures), time.time())
    table = _table(rows)
    table = table.replace_schema_metadata({META_KEY: manifest.to_json().encode()})
    os.makedirs(out_dir, exist_ok=True)
    publish(shard_path(out_dir, sid), lambda tmp: pq.write_table(table, tmp))
    return manifest


def read_manifest(path: str) -> ShardManifest:
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as err:
        raise ShardFileError(f"unreadable shard file {path}: {err}") from err
    if META_KEY not in meta:
        raise ShardFileError(f"{path} has no clipdex manifest; not a clipdex shard")
    return ShardManifest.from_json(meta[META_KEY])


def shard_done(out_dir: str, sid: str) -> bool:
    """The shard's file exists and is readable (a torn or foreign file is redone)."""
    path = shard_path(out_dir, sid)
    if not os.path.exists(path):
        return False
    try:
        return read_manifest(path).shard_id == sid
    except ShardFileError:
        return False


def list_shards(out_dir: str) -> list[tuple[str, ShardManifest]]:
    """(path, manifest) of every shard in `out_dir`, oldest first (the newest row wins)."""
    if not os.path.isdir(out_dir):
        raise ShardFileError(f"no shard folder at {out_dir}")
    found = [(p, read_manifest(p)) for p in glob.glob(os.path.join(out_dir, "shard-*.parquet"))]
    return sorted(found, key=lambda pm: (pm[1].created_at, pm[0]))


def common_identity(shards: list[tuple[str, ShardManifest]]) -> ModelIdentity:
    """The model all shards were made with; refuse a folder that mixes models."""
    if not shards:
        raise ShardFileError("no shard files found")
    first_path, first = shards[0]
    for path, m in shards[1:]:
        diffs = first.model.differences(m.model)
        if diffs:
            raise ModelMismatchError(
                f"shard {os.path.basename(path)} was made with a different model than "
                f"{os.path.basename(first_path)}; refusing to mix vectors:\n  "
                + "\n  ".join(diffs))
    return first.model


def _vectors(table: pa.Table, dim: int) -> FloatArray:
    col = table.column("vector").combine_chunks()
    if col.type.list_size != dim:
        raise ShardFileError(f"shard vectors have dim {col.type.list_size}, model has {dim}")
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(-1, dim)


@dataclass
class ShardBatch:
    """Rows of a shard read back and re-validated, in the store's vocabulary."""

    embedded: list[tuple[ScanEntry, ImageMeta, FloatArray]]
    failures: list[Failure]


def read_batches(path: str, dim: int, rows: int = 4096) -> Iterator[ShardBatch]:
    """Read a shard in batches; a vector that is not a finite unit vector becomes a failure."""
    pf = pq.ParquetFile(path)
    for rb in pf.iter_batches(batch_size=rows):
        t = pa.Table.from_batches([rb])
        ok_mask = pc.is_null(t.column("reason"))
        good, bad = t.filter(ok_mask), t.filter(pc.invert(ok_mask))
        embedded, refused = _embedded(good, dim)
        yield ShardBatch(embedded, refused + _failures(bad.to_pylist()))


def _embedded(t: pa.Table, dim: int
              ) -> tuple[list[tuple[ScanEntry, ImageMeta, FloatArray]], list[Failure]]:
    vecs, reasons = normalize_rows(_vectors(t, dim), dim)
    out, refused = [], []
    for r, vec, why in zip(t.drop_columns(["vector"]).to_pylist(), vecs, reasons, strict=True):
        entry = ScanEntry(r["path"], r["size"], r["mtime_ns"])
        if why is not None:
            refused.append(Failure(r["path"], BAD_EMBEDDING, why, r["size"], r["mtime_ns"],
                                   r["sha256"]))
            continue
        meta = ImageMeta(r["sha256"], r["width"], r["height"], r["format"], r["size"],
                         r["animated"], tuple(r["warnings"] or ()))
        out.append((entry, meta, vec))
    return out, refused


def _failures(rows: list[dict[str, Any]]) -> list[Failure]:
    return [Failure(r["path"], r["reason"], r["message"], r["size"] or 0, r["mtime_ns"] or 0,
                    r["sha256"] or "") for r in rows]


def read_vectors(path: str, dim: int) -> tuple[list[str], FloatArray]:
    """(sha256, unit vector) of a shard's embedded rows, re-validated."""
    t = pq.read_table(path, columns=["sha256", "reason", "vector"])
    t = t.filter(pc.is_null(t.column("reason")))
    vecs, reasons = normalize_rows(_vectors(t, dim), dim)
    keep = [i for i, why in enumerate(reasons) if why is None]
    shas = t.column("sha256").to_pylist()
    return [shas[i] for i in keep], vecs[keep]
