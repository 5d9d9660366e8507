"""Shards: the unit of work of a distributed embedding run.

A collection is planned into shards of N files (deterministic: sorted paths, chunked). A shard's
id is a hash of its sorted path list, so the same collection planned again gives the same ids
and a re-run skips shards whose output already exists. The shard worker is three functions
used by every engine: `decode_entries` (the single-machine decode pool, with its crash and
timeout isolation), `embed_decoded` (model + `normalize_rows`: only validated vectors survive)
and `ShardRows` (what goes into the shard's Parquet file, see shardfile.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .decode import DecodeLimits
from .embed import Embedder
from .scan import scan
from .types import Decoded, Failure, FloatArray, ImageMeta, ScanEntry
from .vectors import BAD_EMBEDDING, normalize_rows
from .workers import DecodePool, Known, WorkerConfig


@dataclass(frozen=True)
class ShardSettings:
    files_per_shard: int = 256
    batch_size: int = 32
    # decode processes: the local engine's for the machine; the ray engine uses 1 per task
    decode_workers: int = field(default_factory=lambda: max(1, min(8, (os.cpu_count() or 2) - 1)))
    chunk: int = 4
    file_timeout: float = 60.0
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    draft_factor: float = 2.0

    def __post_init__(self) -> None:
        for name in ("files_per_shard", "batch_size", "decode_workers", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.file_timeout <= 0:
            raise ValueError("file_timeout must be > 0")

    def worker_config(self, embedder: Embedder) -> WorkerConfig:
        """Decode settings for `embedder`; no store: every file is decoded and embedded."""
        side = int(embedder.input_side * self.draft_factor) if self.draft_factor else None
        return WorkerConfig(embedder.preprocess, self.limits, side, None)


@dataclass(frozen=True)
class Shard:
    """A fixed list of files (and the scan's failures among them), named by their hash."""

    id: str
    entries: tuple[ScanEntry, ...]
    failures: tuple[Failure, ...] = ()

    def __len__(self) -> int:
        return len(self.entries) + len(self.failures)

    def to_json(self) -> str:
        return json.dumps({"id": self.id,
                           "entries": [[e.path, e.size, e.mtime_ns] for e in self.entries],
                           "failures": [[f.path, f.reason, f.message] for f in self.failures]})

    @classmethod
    def from_json(cls, text: str) -> Shard:
        d = json.loads(text)
        return cls(d["id"], tuple(ScanEntry(p, s, m) for p, s, m in d["entries"]),
                   tuple(Failure(p, r, m) for p, r, m in d["failures"]))


def shard_id(paths: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()[:20]


def plan_shards(roots: Iterable[str], files_per_shard: int) -> list[Shard]:
    """Scan `roots` and cut the sorted file list into shards of `files_per_shard`."""
    items = sorted(scan(roots), key=lambda i: i.path)
    shards = []
    for start in range(0, len(items), files_per_shard):
        part = items[start:start + files_per_shard]
        shards.append(Shard(shard_id(i.path for i in part),
                            tuple(i for i in part if isinstance(i, ScanEntry)),
                            tuple(i for i in part if isinstance(i, Failure))))
    return shards


@dataclass
class ShardRows:
    """One shard's results: embedded files with unit vectors, and failed files with reasons."""

    dim: int
    entries: list[ScanEntry] = field(default_factory=list)
    metas: list[ImageMeta] = field(default_factory=list)
    vectors: list[FloatArray] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def add_vector(self, d: Decoded, vec: FloatArray) -> None:
        self.entries.append(d.entry)
        self.metas.append(d.meta)
        self.vectors.append(vec)

    def matrix(self) -> FloatArray:
        if not self.vectors:
            return np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(np.stack(self.vectors), dtype=np.float32)

    def paths(self) -> list[str]:
        return [e.path for e in self.entries] + [f.path for f in self.failures]


def decode_entries(entries: Iterable[ScanEntry], cfg: WorkerConfig, settings: ShardSettings
                   ) -> Iterator[Decoded | Failure]:
    """Decode files in worker processes; a crashing or hanging file costs only itself."""
    pool = DecodePool(cfg, settings.decode_workers, settings.chunk, settings.file_timeout)
    for res in pool.map(entries):
        if isinstance(res, Known):  # cannot happen without a store; never silently drop a file
            yield Failure(res.entry.path, "io_error", "unexpected 'known' result",
                          res.entry.size, res.entry.mtime_ns, res.sha256)
        else:
            yield res


def embed_decoded(decoded: list[Decoded], embedder: Embedder,
                  rows_for: Callable[[Decoded], ShardRows]) -> None:
    """Embed one batch; only rows that pass `normalize_rows` get a vector, the others fail."""
    if not decoded:
        return
    raw = embedder.embed_pixels(np.stack([d.pixels for d in decoded]))
    vecs, reasons = normalize_rows(raw, embedder.dim)
    for d, vec, why in zip(decoded, vecs, reasons, strict=True):
        if why is None:
            rows_for(d).add_vector(d, vec)
        else:
            rows_for(d).failures.append(Failure(d.entry.path, BAD_EMBEDDING, why, d.entry.size,
                                                d.entry.mtime_ns, d.meta.sha256))


def embed_results(results: Iterable[Decoded | Failure], embedder: Embedder, batch_size: int,
                  rows: ShardRows) -> None:
    """Feed one shard's decode results into `rows`, calling the model every `batch_size`."""
    pending: list[Decoded] = []
    for res in results:
        if isinstance(res, Decoded):
            pending.append(res)
            if len(pending) >= batch_size:
                embed_decoded(pending, embedder, lambda _: rows)
                pending = []
        else:
            rows.failures.append(res)
    embed_decoded(pending, embedder, lambda _: rows)


def run_shard(shard: Shard, embedder: Embedder, settings: ShardSettings) -> ShardRows:
    """The whole shard worker in one call: decode, embed, validate (no file written)."""
    rows = ShardRows(embedder.dim, failures=list(shard.failures))
    results = decode_entries(shard.entries, settings.worker_config(embedder), settings)
    embed_results(results, embedder, settings.batch_size, rows)
    return rows


def shard_path(out_dir: str, sid: str) -> str:
    return os.path.join(out_dir, f"shard-{sid}.parquet")
