"""`clipdex index build --from SHARDS --ondisk DIR`: an IVF index too big to build in memory.

Train the IVF once on a seeded sample of the shards, add each shard to its own copy of the
trained index in parallel, then merge the inverted lists into one file on disk with
`faiss.contrib.ondisk.merge_ondisk`; the index file (an IndexIDMap2 over the IVF, ids = the
store's image ids) memory-maps that list file when read. The store must already hold the shards
(`clipdex ingest merge`), which gives the ids; when the index covers every stored image it is
published as the store's index, so `clipdex search` serves it.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import faiss
import numpy as np
import numpy.typing as npt
from faiss.contrib.ondisk import merge_ondisk

from indexer.atomic import publish, publish_bytes
from indexer.errors import IndexError_
from indexer.shardfile import ShardManifest, common_identity, list_shards, read_vectors
from indexer.store import Store, WriterLock, check_identity
from indexer.types import FloatArray, IdArray

from .index import POINTER, IndexInfo, index_dir

log = logging.getLogger(__name__)

MIN_TRAIN = 10_000


@dataclass(frozen=True)
class OnDiskSettings:
    index_type: str = "IVF4096,Flat"
    train_per_list: int = 64  # training sample = this x nlist vectors (FAISS wants 30-256)
    nprobe: int = 16  # default lists probed per query, saved in the index
    workers: int = 2  # shards added in parallel
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.train_per_list, self.nprobe, self.workers) < 1:
            raise ValueError("train_per_list, nprobe and workers must be >= 1")


@dataclass
class _Part:
    path: str
    keep: npt.NDArray[np.bool_]  # rows of read_vectors() that are images not seen before
    positions: IdArray  # their row numbers in the merged index


def build_ondisk(shard_dir: str, out_dir: str, store: Store, settings: OnDiskSettings
                 ) -> IndexInfo:
    """Build the merged on-disk index of the shards in `shard_dir` into `out_dir`."""
    t0 = time.perf_counter()
    shards = list_shards(os.path.abspath(shard_dir))
    ident = common_identity(shards)
    check_identity(store.identity(), ident, store.path)
    generation = store.generation()
    trained = _empty_ivf(ident.dim, settings.index_type)
    nlist = faiss.extract_index_ivf(trained).nlist
    # PQ codebooks (256 centroids per sub-quantizer) want ~10k points even when nlist is small
    sample_size = max(nlist * settings.train_per_list, MIN_TRAIN)
    parts, ids, sample = _assign(shards, store, ident.dim, sample_size, settings.seed)
    if len(sample) < nlist:
        raise IndexError_(f"{settings.index_type} needs at least {nlist} vectors to train, the "
                          f"shards hold {len(sample)}; use a smaller nlist")
    trained.train(sample)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    stamp = time.time_ns()
    index_file = os.path.join(out_dir, f"index-{stamp}.faiss")
    _merge(trained, parts, ids, ident.dim, out_dir, stamp, index_file, settings)
    info = IndexInfo(generation=generation, ntotal=len(ids), dim=ident.dim,
                     index_type=settings.index_type, file=index_file, built_at=time.time(),
                     build_seconds=time.perf_counter() - t0)
    _publish(store, info, out_dir, stamp)
    return info


def _empty_ivf(dim: int, index_type: str) -> faiss.Index:
    try:
        index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError as err:
        raise IndexError_(f"--ondisk needs an IVF index type (e.g. IVF65536,PQ64), got "
                          f"{index_type!r}: {err}") from err
    if hasattr(ivf, "do_polysemous_training"):
        # on by default for IVF-PQ; costs ~30 s even for a small sample and only serves
        # Hamming-threshold search, which clipdex does not use
        ivf.do_polysemous_training = False
    return index


def _assign(shards: list[tuple[str, ShardManifest]], store: Store, dim: int, sample_size: int,
            seed: int) -> tuple[list[_Part], IdArray, FloatArray]:
    """Store ids (each image once) and a seeded training sample, in one pass over the shards."""
    total = max(1, sum(m.embedded for _, m in shards))
    rate = min(1.0, sample_size / total)
    rng = np.random.default_rng(seed)
    seen: set[int] = set()
    parts: list[_Part] = []
    all_ids: list[IdArray] = []
    sample: list[FloatArray] = []
    for path, _ in shards:
        shas, vecs = read_vectors(path, dim)
        ids = np.array([_store_id(store, sha, path) for sha in shas], np.int64)
        keep = np.zeros(len(ids), bool)
        for row, image_id in enumerate(ids.tolist()):
            keep[row] = image_id not in seen
            seen.add(image_id)
        start = sum(len(x) for x in all_ids)
        parts.append(_Part(path, keep, np.arange(start, start + int(keep.sum()), dtype=np.int64)))
        all_ids.append(ids[keep])
        sample.append(vecs[keep][rng.random(int(keep.sum())) < rate])
    return (parts, np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64),
            np.concatenate(sample) if sample else np.zeros((0, dim), np.float32))


def _store_id(store: Store, sha: str, path: str) -> int:
    img = store.image(sha)
    if img is None:
        raise IndexError_(f"image {sha[:12]} of {os.path.basename(path)} is not in the store "
                          f"{store.path}; run `clipdex ingest merge` on these shards first")
    return img.id


def _merge(trained: faiss.Index, parts: list[_Part], ids: IdArray, dim: int, out_dir: str,
           stamp: int, index_file: str, settings: OnDiskSettings) -> None:
    blocks_dir = tempfile.mkdtemp(prefix=".blocks-", dir=out_dir)
    try:
        blob = faiss.serialize_index(trained)

        def add(i_part: tuple[int, _Part]) -> str:
            i, part = i_part
            block = faiss.deserialize_index(blob)
            vecs = read_vectors(part.path, dim)[1][part.keep]
            block.add_with_ids(vecs, part.positions)
            name = os.path.join(blocks_dir, f"block-{i}.index")
            faiss.write_index(block, name)
            return name

        with ThreadPoolExecutor(settings.workers) as pool:  # faiss releases the GIL
            names = list(pool.map(add, enumerate(parts)))
        faiss.extract_index_ivf(trained).nprobe = settings.nprobe
        wrapper = faiss.IndexIDMap2(trained)  # wrap while empty; fill the id map after merging
        with _stdout_to_stderr():  # faiss's C++ reports the file resize on stdout
            merge_ondisk(trained, names, os.path.join(out_dir, f"lists-{stamp}.ivfdata"))
        faiss.copy_array_to_vector(ids, wrapper.id_map)
        wrapper.ntotal = trained.ntotal
        wrapper.construct_rev_map()
        publish(index_file, lambda tmp: faiss.write_index(wrapper, tmp))
    finally:
        shutil.rmtree(blocks_dir, ignore_errors=True)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what C code prints to fd 1 to fd 2, so `--json` output on stdout stays clean."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _publish(store: Store, info: IndexInfo, out_dir: str, stamp: int) -> None:
    """Point the store at the new index when it covers every stored image; drop older files."""
    lock = WriterLock(store.path) if store.readonly else None  # never race a build's publish
    try:
        _publish_locked(store, info, out_dir, stamp)
    finally:
        if lock:
            lock.release()


def _publish_locked(store: Store, info: IndexInfo, out_dir: str, stamp: int) -> None:
    stored = store.counts()["vectors"]
    if info.ntotal != stored or store.generation() != info.generation:
        raise IndexError_(f"the shards hold {info.ntotal} of the store's {stored} images (or the "
                          f"store changed meanwhile); the index was written to {info.file} but "
                          "not published; merge all shards into the store, then build again")
    folder = index_dir(store)
    os.makedirs(folder, exist_ok=True)
    publish_bytes(os.path.join(folder, POINTER), json.dumps(asdict(info), indent=1).encode())
    for old in glob.glob(os.path.join(out_dir, "index-*.faiss")) + glob.glob(
            os.path.join(out_dir, "lists-*.ivfdata")):
        if str(stamp) not in os.path.basename(old):
            os.unlink(old)
