"""Helpers for the scaling-out tests: synthetic shards and a loopback-only network namespace."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import numpy as np

from indexer.embed import FakeEmbedder, ModelIdentity
from indexer.shardfile import write_shard
from indexer.shards import ShardRows
from indexer.types import ImageMeta, ScanEntry


def clustered_vectors(n: int, dim: int, seed: int = 0, clusters: int = 50) -> np.ndarray:
    """Seeded unit vectors around `clusters` centres: an IVF index has structure to find."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_shards(out_dir: str, vecs: np.ndarray, per_shard: int,
                     identity: ModelIdentity | None = None, first: int = 0) -> ModelIdentity:
    """Write `vecs` as shard files, one made-up image per row (path /img/<first + i>.png)."""
    ident = identity or FakeEmbedder(dim=vecs.shape[1]).identity
    for start in range(0, len(vecs), per_shard):
        rows = ShardRows(vecs.shape[1])
        for row in range(start, min(start + per_shard, len(vecs))):
            i = first + row
            sha = hashlib.sha256(str(i).encode()).hexdigest()
            rows.entries.append(ScanEntry(f"/img/{i:07d}.png", 100 + i, 1_000 + i))
            rows.metas.append(ImageMeta(sha, 64, 48, "PNG", 100 + i))
            rows.vectors.append(vecs[row])
        write_shard(out_dir, f"syn{first + start:08d}", rows, ident)
    return ident


def loopback_namespace_prefix() -> list[str] | None:
    """argv prefix that runs a command in a new network namespace with only `lo` up.

    None where namespaces are refused (no CAP_SYS_ADMIN, no user namespaces, no `ip`).
    """
    if not (shutil.which("unshare") and shutil.which("ip")):
        return None
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up && ip -o link"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return None
    links = [line.split(":")[1].strip() for line in probe.stdout.splitlines() if ":" in line]
    if links != ["lo"]:
        return None
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
