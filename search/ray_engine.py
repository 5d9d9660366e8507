"""The `ray` engine of `clipdex embed`: Ray Data streams shards through two stages.

  shards --map_batches(decode, CPU tasks)--> pixels --map_batches(model actors, GPU)--> Parquet

One row is one shard all the way, so a shard's file is written by the actor that embedded it
(atomically; a retried shard rewrites identical content). Decode tasks and model actors scale
independently; each actor loads the model once; Ray Data's streaming executor bounds the pixels
in flight (backpressure). Ray retries tasks and restarts actors whose worker or node died; what
still fails is redone by the next run, which skips shards that have their file.
Ray is imported here only, so clipdex works without the `scale` extra.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import numpy as np

from indexer.embed import ModelIdentity, ModelSpec, OpenClipEmbedder
from indexer.errors import ClipdexError, ModelMismatchError
from indexer.shards import Shard, ShardRows, ShardSettings, decode_entries, embed_results
from indexer.types import Decoded, Failure, ImageMeta, ScanEntry
from indexer.workers import WorkerConfig

from .scale import EmbedProgress, EmbedSummary, RaySettings

log = logging.getLogger(__name__)

Batch = dict[str, Any]


def run_ray(shards: list[Shard], out_dir: str, spec: ModelSpec, settings: ShardSettings,
            rs: RaySettings, summary: EmbedSummary, on_progress: EmbedProgress | None) -> None:
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise ClipdexError("the ray engine needs the scale extra: "
                           "pip install 'clipdex[scale]'") from err
    started = _connect(ray, rs.address)
    try:
        ds = _pipeline(ray, shards, out_dir, spec, settings, rs)
        for row in ds.iter_rows():
            summary.add(int(row["embedded"]), json.loads(row["reasons"]))
            if on_progress:
                on_progress(summary)
    finally:
        if started:
            ray.shutdown()


def _connect(ray: Any, address: str | None) -> bool:
    """Join `address` (or start a local Ray); True when this call started the connection."""
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    return True


def _pipeline(ray: Any, shards: list[Shard], out_dir: str, spec: ModelSpec,
              settings: ShardSettings, rs: RaySettings) -> Any:
    # The driver loads the model once on its CPU for the identity (weights hash) and the exact
    # preprocessing that the decode tasks must apply.
    driver = OpenClipEmbedder(replace(spec, device="cpu"))
    cfg = settings.worker_config(driver)
    gpus = rs.embed_gpus
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the library never prints; callers get on_progress
    ds = ray.data.from_items([{"shard": s.to_json()} for s in shards],
                             override_num_blocks=len(shards))
    ds = ds.map_batches(_decode_stage, batch_size=1, batch_format="numpy",
                        fn_kwargs={"cfg": cfg, "settings": replace(settings, decode_workers=1)},
                        num_cpus=rs.decode_cpus)
    return ds.map_batches(
        _EmbedStage, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=rs.actors[0], max_size=rs.actors[1]),
        fn_constructor_kwargs={"spec": replace(spec, device=rs.device),
                               "identity": driver.identity.to_dict(), "out_dir": out_dir,
                               "batch_size": settings.batch_size},
        num_cpus=0 if gpus else rs.embed_cpus, num_gpus=gpus)


def _decode_stage(batch: Batch, cfg: WorkerConfig, settings: ShardSettings) -> Batch:
    """CPU stage: decode one shard's files in a crash-isolated decode process."""
    shard = Shard.from_json(str(batch["shard"][0]))
    decoded: list[Decoded] = []
    failures: list[Failure] = list(shard.failures)
    for res in decode_entries(shard.entries, cfg, settings):
        (decoded if isinstance(res, Decoded) else failures).append(res)  # type: ignore[arg-type]
    return {"shard": np.array([shard.id], dtype=object),
            "pixels": np.array([_pack_pixels(decoded)], dtype=object),
            "meta": np.array([_pack_meta(shard, decoded, failures)], dtype=object)}


def _pack_pixels(decoded: list[Decoded]) -> bytes:
    return b"".join(np.ascontiguousarray(d.pixels, np.float32).tobytes() for d in decoded)


def _pack_meta(shard: Shard, decoded: list[Decoded], failures: list[Failure]) -> str:
    return json.dumps({
        "shard": shard.to_json(),
        "shape": list(decoded[0].pixels.shape) if decoded else [],
        "decoded": [[d.entry.path, d.entry.size, d.entry.mtime_ns, d.meta.sha256, d.meta.width,
                     d.meta.height, d.meta.format, d.meta.size, d.meta.animated,
                     list(d.meta.warnings)] for d in decoded],
        "failures": [[f.path, f.reason, f.message, f.size, f.mtime_ns, f.sha256]
                     for f in failures],
    })


def _unpack(pixels: bytes, meta_json: str) -> tuple[Shard, list[Decoded], list[Failure]]:
    meta = json.loads(meta_json)
    shape = [len(meta["decoded"]), *meta["shape"]]
    arr = np.frombuffer(pixels, np.float32).reshape(shape) if meta["decoded"] else None
    decoded = []
    for i, (path, size, mtime, sha, w, h, fmt, nbytes, anim, warns) in enumerate(meta["decoded"]):
        assert arr is not None
        decoded.append(Decoded(ScanEntry(path, size, mtime),
                               ImageMeta(sha, w, h, fmt, nbytes, anim, tuple(warns)), arr[i]))
    failures = [Failure(*f) for f in meta["failures"]]
    return Shard.from_json(meta["shard"]), decoded, failures


class _EmbedStage:
    """Model stage: one actor loads the model once and embeds + writes whole shards."""

    def __init__(self, spec: ModelSpec, identity: dict[str, Any], out_dir: str,
                 batch_size: int) -> None:
        self.embedder = OpenClipEmbedder(spec)
        diffs = ModelIdentity.from_dict(identity).differences(self.embedder.identity)
        if diffs:  # e.g. a node with another weights file under the same path
            raise ModelMismatchError("model on this node differs from the driver's:\n  "
                                     + "\n  ".join(diffs))
        self.out_dir = out_dir
        self.batch_size = batch_size

    def __call__(self, batch: Batch) -> Batch:
        from indexer.shardfile import write_shard

        shard, decoded, failures = _unpack(bytes(batch["pixels"][0]), str(batch["meta"][0]))
        rows = ShardRows(self.embedder.dim, failures=failures)
        embed_results(decoded, self.embedder, self.batch_size, rows)
        write_shard(self.out_dir, shard.id, rows, self.embedder.identity)
        return {"shard": np.array([shard.id], dtype=object),
                "embedded": np.array([len(rows.entries)]),
                "reasons": np.array([json.dumps([f.reason for f in rows.failures])],
                                    dtype=object)}
