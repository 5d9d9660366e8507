"""The build pipeline: scan -> decode (workers) -> batch -> embed -> validate -> store.

Each stage is a generator or a short function so it can be timed on its own. The whole
collection is never in memory: at most `lookahead` decoded images wait for the model.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .decode import DecodeLimits
from .embed import Embedder
from .scan import scan
from .store import Batch, Store
from .types import Decoded, Failure, ScanEntry
from .vectors import BAD_EMBEDDING, normalize_rows
from .workers import DecodePool, Known, Result, WorkerConfig, iter_in_thread

log = logging.getLogger(__name__)


def _default_workers() -> int:
    # One worker per core, at a lower priority (BuildSettings.worker_nice): they fill the cores
    # whenever the model leaves them, and yield to it when it is busy. On the 2-core dev box,
    # 2 niced workers beat 1 worker and 2 workers at normal priority
    # (benchmarks/results/build_throughput.txt, "Defaults").
    return max(1, min(8, os.cpu_count() or 2))


@dataclass(frozen=True)
class BuildSettings:
    batch_size: int = 32
    workers: int = field(default_factory=_default_workers)
    chunk: int = 4  # files per worker hand-off; small, so a crash retries few files
    lookahead_batches: int = 3  # decoded batches waiting for the model: enough to hide decode
    # jitter, small enough that RSS stays flat (3 x 32 x 600 KB for ViT-B-32)
    file_timeout: float = 60.0
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    draft_factor: float = 2.0  # images decode/reduce to >= this x the model input side
    worker_nice: int = 10  # decode workers' priority below the model's (0: same priority)
    # The model takes a partial batch of at least this many images rather than wait for
    # decoding (at the start, or on a run of slow files); 0 means batch_size // 4.
    min_batch: int = 0
    prune: bool = False
    retry_failed: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "workers", "chunk", "lookahead_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 <= self.min_batch <= self.batch_size:
            raise ValueError("min_batch must be between 0 and batch_size")
        if not 0 <= self.worker_nice <= 19:
            raise ValueError("worker_nice must be between 0 and 19")
        if self.file_timeout <= 0:
            raise ValueError("file_timeout must be > 0")
        if self.draft_factor and self.draft_factor < 1:
            raise ValueError("draft_factor must be >= 1 (or 0 to decode at full size)")

    @property
    def partial_batch(self) -> int:
        return self.min_batch or max(1, self.batch_size // 4)


@dataclass
class BuildSummary:
    scanned: int = 0
    embedded: int = 0
    linked: int = 0  # same bytes as an already stored image: path recorded, no model call
    unchanged: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    pruned: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0


Progress = Callable[[BuildSummary], None]


class _Idle:
    """From the decode queue: nothing decoded is waiting right now."""


_IDLE = _Idle()


class Indexer:
    """Embeds new and changed files under some roots into a store."""

    def __init__(self, embedder: Embedder, store: Store, settings: BuildSettings) -> None:
        self.embedder = embedder
        self.store = store
        self.settings = settings

    def build(self, roots: Iterable[str], on_progress: Progress | None = None) -> BuildSummary:
        roots = [os.path.abspath(r) for r in roots]
        summary = BuildSummary()
        t0 = time.perf_counter()
        seen: set[str] = set()
        batch = Batch()
        pending: list[Decoded] = []
        bs = self.settings.batch_size
        for item in self._decoded(roots, summary, seen):
            if isinstance(item, _Idle):  # decoding is behind: embed what is ready rather than wait
                ready = len(pending) >= self.settings.partial_batch
            else:
                self._route(item, batch, pending, summary)
                ready = len(pending) >= bs or len(batch) >= 4 * bs
            if ready:
                self._flush(batch, pending, summary)
                batch, pending = Batch(), []
                summary.seconds = time.perf_counter() - t0
                if on_progress:
                    on_progress(summary)
        self._flush(batch, pending, summary)
        if self.settings.prune:
            summary.pruned = self.store.prune(seen, roots)
        summary.seconds = time.perf_counter() - t0
        if on_progress:
            on_progress(summary)
        return summary

    def _decoded(self, roots: list[str], summary: BuildSummary, seen: set[str]
                 ) -> Iterator[Result | _Idle]:
        """Scan, skip unchanged files, and decode the rest in worker processes."""
        scan_failures: list[Failure] = []

        def todo() -> Iterator[ScanEntry]:
            for item in scan(roots):
                seen.add(item.path)
                summary.scanned += 1
                if isinstance(item, Failure):
                    scan_failures.append(item)
                elif self._unchanged(item):
                    summary.unchanged += 1
                else:
                    yield item

        cfg = WorkerConfig(self.embedder.preprocess, self.settings.limits, self._min_side(),
                           self.store.path, nice=self.settings.worker_nice)
        pool = DecodePool(cfg, self.settings.workers, self.settings.chunk,
                          self.settings.file_timeout)
        lookahead = self.settings.lookahead_batches * self.settings.batch_size
        yield from iter_in_thread(pool.map(todo()), lookahead, idle=_IDLE)
        yield from scan_failures

    def _min_side(self) -> int | None:
        f = self.settings.draft_factor
        return int(self.embedder.input_side * f) if f else None

    def _unchanged(self, entry: ScanEntry) -> bool:
        if not self.store.is_unchanged(entry):
            return False
        if self.settings.retry_failed:
            return self.store.sha_for_path(entry.path) is not None
        return True

    @staticmethod
    def _route(item: Result, batch: Batch, pending: list[Decoded], summary: BuildSummary
               ) -> None:
        if isinstance(item, Decoded):
            pending.append(item)
        elif isinstance(item, Known):
            batch.linked.append((item.entry, item.sha256))
            summary.linked += 1
        else:
            batch.failures.append(item)
            summary.failed[item.reason] += 1

    def _flush(self, batch: Batch, pending: list[Decoded], summary: BuildSummary) -> None:
        if pending:
            self._embed(pending, batch, summary)
        self.store.commit(batch)

    def _embed(self, pending: list[Decoded], batch: Batch, summary: BuildSummary) -> None:
        pixels = np.stack([d.pixels for d in pending])
        raw = self.embedder.embed_pixels(pixels)
        vecs, reasons = normalize_rows(raw, self.embedder.dim)
        for d, vec, why in zip(pending, vecs, reasons, strict=True):
            if why is None:
                batch.embedded.append((d.entry, d.meta, vec))
                summary.embedded += 1
            else:
                batch.failures.append(Failure(d.entry.path, BAD_EMBEDDING, why, d.entry.size,
                                              d.entry.mtime_ns, d.meta.sha256))
                summary.failed[BAD_EMBEDDING] += 1
