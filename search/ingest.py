"""`clipdex ingest merge`: load shard files into the LMDB store, as its one writer.

Every shard's manifest must name the same model as the others and as the store (a folder or
store that would mix models is refused before anything is written). Vectors are re-validated
on the way in; one store transaction per batch, so a killed merge resumes by running it again
(rows already stored are no-ops: same path, same bytes). Shards are read oldest first, so when
two shards hold the same path the newest one wins.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from indexer.shardfile import common_identity, list_shards, read_batches
from indexer.store import Batch, Store

log = logging.getLogger(__name__)


@dataclass
class MergeSummary:
    shards: int = 0
    rows: int = 0
    embedded: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    images: int = 0  # distinct images in the store afterwards
    seconds: float = 0.0


MergeProgress = Callable[[MergeSummary], None]


def merge_shards(shard_dir: str, store_path: str, wait: float = 0.0, batch_rows: int = 4096,
                 on_progress: MergeProgress | None = None) -> MergeSummary:
    """Commit every shard in `shard_dir` into the store (created if missing)."""
    t0 = time.perf_counter()
    shards = list_shards(os.path.abspath(shard_dir))
    identity = common_identity(shards)
    summary = MergeSummary()
    with Store.create_or_open(store_path, identity, wait=wait) as store:
        for path, _ in shards:
            for part in read_batches(path, identity.dim, batch_rows):
                store.commit(Batch(embedded=part.embedded, failures=part.failures))
                summary.rows += len(part.embedded) + len(part.failures)
                summary.embedded += len(part.embedded)
                summary.failed.update(f.reason for f in part.failures)
            summary.shards += 1
            if on_progress:
                on_progress(summary)
        summary.images = store.counts()["images"]
    summary.seconds = time.perf_counter() - t0
    return summary
