"""Scaling-out measurements behind the README's "Scaling out" sizes. Prints tables.

1. Engine overhead: `clipdex embed` local vs ray on the same images (tiny model, so what is
   measured is the engines' own cost: Ray start-up, per-shard decode process, scheduling).
   The ray run needs a loopback-only network namespace (`unshare -n`), like the tests.
2. Index: in-memory IVF build from the store vs train-once / add-shards / merge-on-disk, on
   synthetic clustered 512-d vectors: seconds, peak anonymous memory (each in its own
   process), recall@10 at nprobe 16.
3. Milvus export rate into milvus-lite.

Usage: python benchmarks/scale_out.py [--images 96] [--vectors 100000] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

SHARD_ROWS = 2000  # the on-disk build holds ~2 shards at a time, whatever the total
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _engine_run(engine: str, photos: str, out: str, workers: int) -> dict[str, float]:
    from indexer.embed import ModelSpec
    from indexer.shards import ShardSettings
    from search.scale import RaySettings, run_embed
    from tests.conftest import TINY_CONFIG

    spec = ModelSpec(name="clipdex-tiny", pretrained=None, random_init=True,
                     model_config=TINY_CONFIG, device="cpu")
    settings = ShardSettings(files_per_shard=32, decode_workers=workers)
    t0 = time.perf_counter()
    s = run_embed([photos], out, spec, settings, engine,
                  RaySettings(decode_cpus=1.0, embed_cpus=0.5, actors=(1, 1)))
    return {"seconds": time.perf_counter() - t0, "embedded": s.embedded, "shards": s.written}


class _AnonPeak:
    """Peak anonymous RSS, sampled: mmapped index and list files count in ru_maxrss but are
    page cache the kernel can drop, so they would hide what the on-disk build saves."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) / 1024)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def _index_run(kind: str, index_type: str, work: str) -> dict[str, float]:
    import numpy as np

    from indexer.store import Store
    from search.index import build_index
    from search.ondisk import OnDiskSettings, build_ondisk
    from tests.scale_helpers import clustered_vectors

    with Store.open(os.path.join(work, "s.clipdex"), readonly=kind == "ondisk") as st:
        sampler = _AnonPeak()
        t0 = time.perf_counter()
        if kind == "ondisk":
            build_ondisk(os.path.join(work, "emb"), os.path.join(work, "od"), st,
                         OnDiskSettings(index_type=index_type, nprobe=16, workers=2))
            from search.index import load_index

            vindex = load_index(st)
        else:
            vindex = build_index(st, index_type)
            vindex.tune(nprobe=16)
        seconds = time.perf_counter() - t0
        peak = sampler.stop()  # before the ground truth below
        queries = clustered_vectors(200, 512, seed=99, clusters=200)
        _, got = vindex.search(queries, 10)
        _, truth = build_index(st, "Flat").search(queries, 10)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got, strict=True)]))
    return {"seconds": seconds, "recall@10": recall,
            "peak_rss_mib": peak}


def _child(args: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def engines(n_images: int, skip_ray: bool) -> None:
    from tests.conftest import scene

    work = tempfile.mkdtemp(prefix="scale-bench-")
    photos = os.path.join(work, "photos")
    os.makedirs(photos)
    for i in range(n_images):
        scene(i, (320, 240)).save(os.path.join(photos, f"p{i:04d}.png"))
    print(f"## engines: {n_images} images 320x240, tiny model, shards of 32")
    print(f"{'engine':<8} {'seconds':>8} {'images/s':>9}  note")
    for engine in ("local",) + (() if skip_ray else ("ray",)):
        args = ["engine", engine, photos, os.path.join(work, f"out-{engine}")]
        prefix = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
        if engine == "ray":
            proc = subprocess.run([*prefix, sys.executable, __file__, "--child", *args],
                                  capture_output=True, text=True, cwd=ROOT, timeout=3600)
            res = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                   else {"error": proc.stderr.strip()[-300:]})
        else:
            res = _child(args)
        if "error" in res:
            print(f"{engine:<8} failed: {res['error']}")
            continue
        rate = res["embedded"] / res["seconds"]
        print(f"{engine:<8} {res['seconds']:>8.1f} {rate:>9.1f}  {res['shards']:.0f} shards "
              "(ray: includes cluster start-up)")
    shutil.rmtree(work, ignore_errors=True)


def index(n: int) -> None:
    from search.ingest import merge_shards
    from tests.scale_helpers import clustered_vectors, synthetic_shards

    work = tempfile.mkdtemp(prefix="scale-index-")
    vecs = clustered_vectors(n, 512, seed=1, clusters=200)
    t0 = time.perf_counter()
    synthetic_shards(os.path.join(work, "emb"), vecs, SHARD_ROWS)
    t1 = time.perf_counter()
    merged = merge_shards(os.path.join(work, "emb"), os.path.join(work, "s.clipdex"))
    t2 = time.perf_counter()
    print(f"\n## index: {n:,} synthetic 512-d vectors in shards of {SHARD_ROWS:,} "
          f"(write shards {t1 - t0:.1f}s; ingest merge {t2 - t1:.1f}s = "
          f"{merged.embedded / (t2 - t1):,.0f} rows/s)")
    print(f"{'build':<10} {'index':<14} {'seconds':>8} {'peak anon MiB':>13} {'recall@10':>10}")
    # The in-memory IVF-PQ build (search/index.py) keeps faiss's polysemous training on, which
    # took > 9 minutes here; the on-disk build turns it off. So PQ64 is measured on disk only.
    for index_type, kinds in (("IVF256,Flat", ("memory", "ondisk")), ("IVF256,PQ64", ("ondisk",))):
        for kind in kinds:
            r = _child(["index", kind, index_type, work])
            if "error" in r:
                print(f"{kind:<10} {index_type:<14} failed: {r['error']}")
                continue
            print(f"{kind:<10} {index_type:<14} {r['seconds']:>8.1f} {r['peak_rss_mib']:>13.0f} "
                  f"{r['recall@10']:>10.3f}")
    milvus(work)
    shutil.rmtree(work, ignore_errors=True)


def milvus(work: str) -> None:
    from indexer.store import Store
    from search.milvus_export import MilvusTarget, export_store

    with Store.open(os.path.join(work, "s.clipdex"), readonly=True) as st:
        s = export_store(st, MilvusTarget(os.path.join(work, "m.db"), "images", "FLAT"))
    print(f"\n## milvus-lite export: {s.rows:,} rows in {s.seconds:.1f}s "
          f"({s.rows / s.seconds:,.0f} rows/s)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--vectors", type=int, default=100_000)
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--skip-engines", action="store_true")
    p.add_argument("--child", nargs="+")
    a = p.parse_args()
    if a.child:
        kind, *rest = a.child
        res = (_engine_run(rest[0], rest[1], rest[2], 1) if kind == "engine"
               else _index_run(*rest))
        print(json.dumps(res))
        return
    print(f"# clipdex scale-out benchmark {time.strftime('%Y-%m-%d %H:%M')}; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    if not a.skip_engines:
        engines(a.images, a.skip_ray)
    index(a.vectors)


if __name__ == "__main__":
    main()
