"""Child process of test_scale_ray.py: runs `clipdex embed --engine ray` on a real Ray cluster
and disrupts it mid-job. It runs inside a loopback-only network namespace (see the test).

Usage: python -m tests.ray_child CONFIG.json; writes the JSON report named in the config.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from indexer.embed import ModelSpec
from indexer.shards import ShardSettings
from search.scale import RaySettings, run_embed


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        for kid in children.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill_model_actor() -> str | None:
    """SIGKILL the Ray worker that holds the model (only among this process's descendants)."""
    for pid in _descendants(os.getpid()):
        if "_EmbedStage" in _cmdline(pid):
            os.kill(pid, signal.SIGKILL)
            return f"pid {pid}: {_cmdline(pid) or 'model actor'}".strip()
    return None


def _start(mode: str) -> Any:
    import ray

    if mode == "kill-worker":
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        return None
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=150 << 20)
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def _embed(cfg: dict[str, Any]) -> dict[str, Any]:
    spec = ModelSpec(name="clipdex-tiny", pretrained=None, weights=cfg["weights"],
                     model_config=cfg["model_config"], device="cpu")
    settings = ShardSettings(files_per_shard=cfg["shard_size"], batch_size=4, decode_workers=1)
    # kill-worker: one decode task at a time (1.5 of 2 CPUs), so shards reach the model one by
    # one and the job is still running when the first shard file appears; with decoding fast
    # (torch-free workers) and 4 parallel decode tasks, all shards could land within one poll
    decode_cpus = 1.5 if cfg["mode"] == "kill-worker" else 0.5
    rs = RaySettings(decode_cpus=decode_cpus, embed_cpus=0.25, actors=(1, 1))
    try:
        s = run_embed(cfg["roots"], cfg["out"], spec, settings, "ray", rs)
        return {"written": s.written, "skipped": s.skipped, "embedded": s.embedded,
                "failed": dict(s.failed)}
    except Exception as err:  # reported; the test decides
        return {"error": f"{type(err).__name__}: {err}"}


def main(config: str) -> None:
    cfg = json.loads(Path(config).read_text())
    t0 = time.monotonic()
    cluster = _start(cfg["mode"])
    report: dict[str, Any] = {"mode": cfg["mode"], "ray_start_s": time.monotonic() - t0}
    result: dict[str, Any] = {}
    job = threading.Thread(target=lambda: result.update(_embed(cfg)), daemon=True)
    job.start()
    deadline = time.monotonic() + cfg["timeout"]
    while job.is_alive() and time.monotonic() < deadline:
        done = len(list(Path(cfg["out"]).glob("shard-*.parquet")))
        if done >= 1:
            report["shards_before_disruption"] = done
            report["first_shard_s"] = time.monotonic() - t0
            if cfg["mode"] == "kill-worker":
                report["disrupted"] = _kill_model_actor()
            else:
                cluster.remove_node(cluster.list_all_nodes()[1], allow_graceful=False)
                report["disrupted"] = "removed a worker node"
            break
        time.sleep(0.05)
    job.join(max(1.0, deadline - time.monotonic()))
    report["first_run"] = result if not job.is_alive() else {"error": "timed out"}
    report["job_s"] = time.monotonic() - t0
    if "error" in report["first_run"]:  # clipdex's own resume: run again, skip written shards
        report["resumed_run"] = _embed(cfg)
    Path(cfg["report"]).write_text(json.dumps(report))
    import ray

    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
