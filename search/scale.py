"""`clipdex embed`: plan shards, skip those already written, run the rest on an engine.

Engines: `local` streams every pending shard through one decode process pool and the model in
this process; `ray` (search/ray_engine.py) runs decode tasks and model actors on a Ray cluster.
Both write one Parquet file per shard (indexer/shardfile.py) and share the shard worker
functions of indexer/shards.py, so their output is interchangeable.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from indexer.embed import Embedder, ModelSpec
from indexer.shards import (
    Shard,
    ShardRows,
    ShardSettings,
    decode_entries,
    embed_decoded,
    plan_shards,
)
from indexer.types import Decoded, ScanEntry

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")


@dataclass
class EmbedSummary:
    engine: str
    shards: int = 0
    skipped: int = 0  # already had output from an earlier run
    written: int = 0
    embedded: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0

    def add(self, embedded: int, failed: Iterable[str]) -> None:
        self.written += 1
        self.embedded += embedded
        self.failed.update(failed)


EmbedProgress = Callable[[EmbedSummary], None]


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: start a local Ray; "auto": join the running cluster
    decode_cpus: float = 1.0  # per decode task (one decode process each)
    embed_cpus: float = 1.0  # per model actor when there is no GPU
    embed_gpus: float | None = None  # per model actor; None: 1 when the cluster has GPUs
    actors: tuple[int, int] = (1, 4)  # model actor pool size (min, max)
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.decode_cpus <= 0 or self.embed_cpus < 0:
            raise ValueError("decode_cpus must be > 0 and embed_cpus >= 0")
        if not 1 <= self.actors[0] <= self.actors[1]:
            raise ValueError("actors must be (min, max) with 1 <= min <= max")


def run_embed(roots: Iterable[str], out_dir: str, spec: ModelSpec | None, settings: ShardSettings,
              engine: str = "local", ray: RaySettings | None = None,
              on_progress: EmbedProgress | None = None,
              embedder: Embedder | None = None) -> EmbedSummary:
    """Embed every file under `roots` into shard files in `out_dir`; resumable.

    `spec` names the model; the local engine may be given a ready `embedder` instead (tests).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if spec is None and (embedder is None or engine == "ray"):
        raise ValueError("give a model spec (the ray engine loads the model on each actor)")
    t0 = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    from indexer.shardfile import shard_done

    shards = plan_shards([os.path.abspath(r) for r in roots], settings.files_per_shard)
    pending = [s for s in shards if not shard_done(out_dir, s.id)]
    summary = EmbedSummary(engine, shards=len(shards), skipped=len(shards) - len(pending))
    log.info("%d shards, %d already written", len(shards), summary.skipped)
    if pending and engine == "local":
        from .app import load_embedder

        emb = embedder if embedder is not None else load_embedder(spec)  # type: ignore[arg-type]
        run_local(pending, out_dir, emb, settings, summary, on_progress)
    elif pending and spec is not None:
        from .ray_engine import run_ray

        run_ray(pending, out_dir, spec, settings, ray or RaySettings(), summary, on_progress)
    summary.seconds = time.perf_counter() - t0
    return summary


class _Tracker:
    """Per-shard results of the local engine; a shard is written once all its files are in."""

    def __init__(self, shards: list[Shard], dim: int) -> None:
        self.rows = {s.id: ShardRows(dim, failures=list(s.failures)) for s in shards}
        self.left = {s.id: len(s.entries) for s in shards}
        self.owner = {e.path: s.id for s in shards for e in s.entries}

    def rows_for(self, d: Decoded) -> ShardRows:
        return self.rows[self.owner[d.entry.path]]

    def done(self, paths: Iterable[str]) -> Iterator[str]:
        """Count `paths` as finished; yield the ids of shards that became complete."""
        for p in paths:
            sid = self.owner[p]
            self.left[sid] -= 1
            if self.left[sid] == 0:
                yield sid


def run_local(shards: list[Shard], out_dir: str, embedder: Embedder, settings: ShardSettings,
              summary: EmbedSummary, on_progress: EmbedProgress | None = None) -> None:
    """One decode pool for all shards (no per-shard start-up), the model in this process."""
    from indexer.shardfile import write_shard

    track = _Tracker(shards, embedder.dim)

    def finish(sids: Iterable[str]) -> None:
        for sid in sids:
            rows = track.rows.pop(sid)
            write_shard(out_dir, sid, rows, embedder.identity)
            summary.add(len(rows.entries), (f.reason for f in rows.failures))
            if on_progress:
                on_progress(summary)

    finish([s.id for s in shards if not s.entries])
    entries: Iterator[ScanEntry] = (e for s in shards for e in s.entries)
    pending: list[Decoded] = []
    for res in decode_entries(entries, settings.worker_config(embedder), settings):
        if isinstance(res, Decoded):
            pending.append(res)
            if len(pending) < settings.batch_size:
                continue
            embed_decoded(pending, embedder, track.rows_for)
            finish(track.done(d.entry.path for d in pending))
            pending = []
        else:
            track.rows[track.owner[res.path]].failures.append(res)
            finish(track.done([res.path]))
    embed_decoded(pending, embedder, track.rows_for)
    finish(track.done(d.entry.path for d in pending))
