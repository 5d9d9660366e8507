"""The LMDB store: vectors, image metadata, paths, failures and labels, with a manifest.

Layout inside the store directory: `data.mdb`/`lock.mdb` (LMDB), `write.lock` (one writer at a
time), and `index/` (FAISS files, owned by search/). The store owns its schema: a
`schema_version` key and numbered migrations. One write transaction per batch, so a build killed
at any moment leaves the last committed batch intact and resumes after it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import lmdb
import numpy as np

from .embed import ModelIdentity
from .errors import ModelMismatchError, StoreError, StoreLockedError
from .types import Failure, FloatArray, IdArray, ImageMeta, ScanEntry

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
INITIAL_MAP_SIZE = 256 << 20  # grown on demand (MapFullError), sparse on disk
MAX_MAP_SIZE = 1 << 40
LOCK_FILE_BYTES = 64 << 10  # > LMDB's lock file for max_readers=256 (16.5 KiB)
# LMDB's locking is unsafe over these (the LMDB docs say so); refuse rather than corrupt.
NETWORK_FILESYSTEMS = frozenset(
    "nfs nfs4 cifs smb smb2 smb3 smbfs ncpfs afs fuse.sshfs sshfs glusterfs fuse.glusterfs "
    "lustre ceph fuse.ceph 9p fuse.s3fs fuse.gcsfuse davfs fuse.rclone".split()
)
DBS = ("meta", "vectors", "by_id", "images", "paths", "failures", "labels", "ocr")
OPTIONAL_DBS = frozenset({"ocr"})  # added later: a read-only open of an older store lacks it
T = TypeVar("T")


def _id_key(i: int) -> bytes:
    return int(i).to_bytes(8, "big")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _loads(raw: bytes | memoryview | None) -> Any:
    return None if raw is None else json.loads(bytes(raw))


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding `path`, from /proc/self/mounts ('' when unknown)."""
    real = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        return ""
    return kind


def _reserve_lock_file(path: str) -> None:
    """Allocate LMDB's lock file before LMDB maps it: LMDB writes it through a shared mmap, and
    on a full disk (tmpfs at least) that write is a SIGBUS instead of an error we can report."""
    fd = os.open(os.path.join(path, "lock.mdb"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, LOCK_FILE_BYTES)
    finally:
        os.close(fd)


def _disk_note(path: str) -> str:
    """' (the disk ... is full)' when little space is left: LMDB reports a short write as EIO."""
    try:
        st = os.statvfs(path)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    return f" (the disk holding it is full: {free} bytes free)" if free < (16 << 20) else ""


def refuse_network_fs(path: str) -> None:
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    kind = filesystem_type(probe)
    if kind in NETWORK_FILESYSTEMS or kind.startswith("nfs"):
        raise StoreError(
            f"{path} is on a network filesystem ({kind}); LMDB's file locking is not safe there "
            "and the store could be corrupted. Put the store on a local disk (the images "
            "themselves may stay on the network share)."
        )


@dataclass
class Batch:
    """What one pipeline batch commits in a single transaction."""

    embedded: list[tuple[ScanEntry, ImageMeta, FloatArray]] = field(default_factory=list)
    linked: list[tuple[ScanEntry, str]] = field(default_factory=list)  # known bytes, new path
    failures: list[Failure] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.embedded) + len(self.linked) + len(self.failures)


@dataclass(frozen=True)
class StoredImage:
    id: int
    sha256: str
    paths: tuple[str, ...]
    width: int
    height: int
    format: str
    size: int
    animated: bool
    warnings: tuple[str, ...]


class WriterLock:
    """An exclusive flock on `write.lock`; the second writer waits up to `wait` s, then fails."""

    def __init__(self, folder: str, wait: float = 0.0) -> None:
        self.path = os.path.join(folder, "write.lock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip()
                    os.close(self._fd)
                    raise StoreLockedError(
                        f"another clipdex process (pid {holder or '?'}) is writing to {folder}; "
                        "wait for it to finish, or pass --wait SECONDS"
                    ) from None
                time.sleep(0.1)
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        except OSError:  # disk full: the pid is only a hint for the "locked" message
            pass

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class Store:
    """One clipdex store directory. Open with `Store.open` (readers) or `Store.create_or_open`."""

    def __init__(self, path: str, env: lmdb.Environment, readonly: bool,
                 lock: WriterLock | None) -> None:
        self.path = path
        self.env = env
        self.readonly = readonly
        self._lock = lock
        self._db = {name: db for name in DBS if (db := self._open_db(env, name)) is not None}

    @staticmethod
    def _open_db(env: lmdb.Environment, name: str) -> Any:
        try:
            return env.open_db(name.encode(), create=False)
        except lmdb.NotFoundError:
            if name in OPTIONAL_DBS:
                return None  # read-only open of a store written before this sub-db existed
            raise

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, readonly: bool = True, wait: float = 0.0) -> Store:
        path = os.path.abspath(path)
        if not os.path.exists(os.path.join(path, "data.mdb")):
            raise StoreError(f"no clipdex store at {path} (build one with `clipdex index build`)")
        return cls._open(path, readonly, wait)

    @classmethod
    def create_or_open(cls, path: str, identity: ModelIdentity, wait: float = 0.0) -> Store:
        """Open for writing; a new store records `identity`, an old one must match it."""
        path = os.path.abspath(path)
        refuse_network_fs(path)
        os.makedirs(path, exist_ok=True)
        store = cls._open(path, readonly=False, wait=wait)
        try:
            store._init_or_check(identity)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _open(cls, path: str, readonly: bool, wait: float) -> Store:
        refuse_network_fs(path)
        lock = None if readonly else WriterLock(path, wait)
        try:
            if not readonly:
                _reserve_lock_file(path)
            size = os.path.getsize(os.path.join(path, "data.mdb")) if os.path.exists(
                os.path.join(path, "data.mdb")) else 0
            env = lmdb.open(path, map_size=max(INITIAL_MAP_SIZE, size), max_dbs=len(DBS) + 2,
                            readonly=readonly, subdir=True, lock=True, max_readers=256,
                            readahead=False)
            env.reader_check()  # clear slots of readers that were killed
            if not readonly:
                with env.begin(write=True) as txn:
                    for name in DBS:
                        env.open_db(name.encode(), txn=txn, create=True)
            store = cls(path, env, readonly, lock)
        except (lmdb.Error, OSError) as err:
            if lock:
                lock.release()
            raise StoreError(f"cannot open store {path}: {err}{_disk_note(path)}") from err
        if not readonly:
            store._migrate()
        return store

    def close(self) -> None:
        self.env.close()
        if self._lock:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- schema and manifest -----------------------------------------------------------------
    def _migrate(self) -> None:
        with self.env.begin(write=True, db=self._db["meta"]) as txn:
            raw = txn.get(b"schema_version")
            version = int(raw) if raw else SCHEMA_VERSION
            if version > SCHEMA_VERSION:
                raise StoreError(f"store schema {version} is newer than this clipdex "
                                 f"({SCHEMA_VERSION}); upgrade clipdex")
            # Numbered migrations go here: `if version < 2: ...; version = 2`.
            txn.put(b"schema_version", str(version).encode())

    def _init_or_check(self, identity: ModelIdentity) -> None:
        current = self.manifest()
        if current is None:
            self._write_meta(b"manifest", {"schema_version": SCHEMA_VERSION,
                                            "created_at": time.time(),
                                            "model": identity.to_dict()})
            return
        check_identity(ModelIdentity.from_dict(current["model"]), identity, self.path)
        current["last_build_versions"] = identity.versions
        self._write_meta(b"manifest", current)

    def _write_meta(self, key: bytes, value: Any) -> None:
        self._write(lambda txn: txn.put(key, _dumps(value), db=self._db["meta"]))

    def manifest(self) -> dict[str, Any] | None:
        with self._begin(db=self._db["meta"]) as txn:
            return _loads(txn.get(b"manifest"))

    def identity(self) -> ModelIdentity:
        m = self.manifest()
        if m is None:
            raise StoreError(f"store {self.path} has no manifest (never built)")
        return ModelIdentity.from_dict(m["model"])

    def generation(self) -> int:
        with self._begin(db=self._db["meta"]) as txn:
            return int(txn.get(b"generation") or 0)

    # ---- writing -------------------------------------------------------------------------------
    def _write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run `fn` in one write transaction; on MapFullError grow the map and retry it whole."""
        if self.readonly:
            raise StoreError("store opened read-only")
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as err:  # e.g. DiskError (ENOSPC): the transaction was aborted
                raise StoreError(f"cannot write to store {self.path}: {err}"
                                 f"{_disk_note(self.path)}. Data committed before this is "
                                 "intact; fix the cause and run again.") from err

    def _begin(self, **kw: Any) -> lmdb.Transaction:
        """A read transaction; adopts a map that the writer (another process) grew meanwhile."""
        try:
            return self.env.begin(**kw)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.env.begin(**kw)

    def _grow(self) -> None:
        size = self.env.info()["map_size"]
        if size >= MAX_MAP_SIZE:
            raise StoreError(f"store map reached {MAX_MAP_SIZE} bytes")
        log.info("growing LMDB map from %d to %d bytes", size, size * 2)
        self.env.set_mapsize(size * 2)

    def commit(self, batch: Batch) -> None:
        """Write one batch atomically and bump the generation if the vector set changed."""
        if len(batch):
            self._write(lambda txn: self._commit_txn(txn, batch))

    def _commit_txn(self, txn: lmdb.Transaction, batch: Batch) -> None:
        changed = False
        meta = self._db["meta"]
        next_id = int(txn.get(b"next_id", db=meta) or 1)
        for entry, img, vec in batch.embedded:
            sha = img.sha256
            if txn.get(sha.encode(), db=self._db["images"]) is None:
                self._put_image(txn, next_id, img, vec)
                next_id, changed = next_id + 1, True
            changed |= self._set_path(txn, entry, sha)
        for entry, sha in batch.linked:
            changed |= self._set_path(txn, entry, sha)
        for fail in batch.failures:
            changed |= self._unlink_path(txn, fail.path)
            txn.put(fail.path.encode(), _dumps({
                "reason": fail.reason, "message": fail.message, "size": fail.size,
                "mtime_ns": fail.mtime_ns, "sha256": fail.sha256, "at": time.time()}),
                db=self._db["failures"])
        txn.put(b"next_id", str(next_id).encode(), db=meta)
        if changed:
            txn.put(b"generation", str(int(txn.get(b"generation", db=meta) or 0) + 1).encode(),
                    db=meta)

    def _put_image(self, txn: lmdb.Transaction, new_id: int, img: ImageMeta,
                   vec: FloatArray) -> None:
        data = np.ascontiguousarray(vec, dtype=np.float32)
        txn.put(_id_key(new_id), data.tobytes(), db=self._db["vectors"])
        txn.put(_id_key(new_id), img.sha256.encode(), db=self._db["by_id"])
        txn.put(img.sha256.encode(), _dumps({
            "id": new_id, "width": img.width, "height": img.height, "format": img.format,
            "size": img.size, "animated": img.animated, "warnings": list(img.warnings),
            "paths": []}), db=self._db["images"])

    def _set_path(self, txn: lmdb.Transaction, entry: ScanEntry, sha: str) -> bool:
        key = entry.path.encode()
        old = _loads(txn.get(key, db=self._db["paths"]))
        changed = False
        if old and old["sha"] != sha:
            changed = self._unlink_path(txn, entry.path)
        txn.delete(key, db=self._db["failures"])
        txn.put(key, _dumps({"sha": sha, "size": entry.size, "mtime_ns": entry.mtime_ns}),
                db=self._db["paths"])
        img = _loads(txn.get(sha.encode(), db=self._db["images"]))
        if entry.path not in img["paths"]:
            img["paths"] = sorted([*img["paths"], entry.path])
            txn.put(sha.encode(), _dumps(img), db=self._db["images"])
        return changed

    def _unlink_path(self, txn: lmdb.Transaction, path: str) -> bool:
        """Forget `path`; drop its image (and vector) when no path is left. True if dropped."""
        key = path.encode()
        old = _loads(txn.get(key, db=self._db["paths"]))
        if old is None:
            return False
        txn.delete(key, db=self._db["paths"])
        img = _loads(txn.get(old["sha"].encode(), db=self._db["images"]))
        if img is None:
            return False
        img["paths"] = [p for p in img["paths"] if p != path]
        if img["paths"]:
            txn.put(old["sha"].encode(), _dumps(img), db=self._db["images"])
            return False
        txn.delete(old["sha"].encode(), db=self._db["images"])
        txn.delete(_id_key(img["id"]), db=self._db["vectors"])
        txn.delete(_id_key(img["id"]), db=self._db["by_id"])
        txn.delete(old["sha"].encode(), db=self._db["labels"])
        return True

    def prune(self, keep: set[str], roots: list[str]) -> int:
        """Forget paths under `roots` that are not in `keep` (files that vanished)."""
        prefixes = [r.rstrip(os.sep) + os.sep for r in roots]
        gone = [p for p in self.iter_paths()
                if (p in roots or any(p.startswith(x) for x in prefixes)) and p not in keep]
        gone_failed = [p for p, _ in self.iter_failures()
                       if any(p.startswith(x) for x in prefixes) and p not in keep]

        def txn_fn(txn: lmdb.Transaction) -> None:
            changed = False
            for p in gone:
                changed |= self._unlink_path(txn, p)
            for p in gone_failed:
                txn.delete(p.encode(), db=self._db["failures"])
            if changed:
                meta = self._db["meta"]
                gen = int(txn.get(b"generation", db=meta) or 0) + 1
                txn.put(b"generation", str(gen).encode(), db=meta)

        self._write(txn_fn)
        return len(gone)

    # ---- reading -------------------------------------------------------------------------------
    def is_unchanged(self, entry: ScanEntry) -> bool:
        """Same size and mtime as when last seen (indexed or quarantined)."""
        key = entry.path.encode()
        with self._begin() as txn:
            rec = _loads(txn.get(key, db=self._db["paths"])) or _loads(
                txn.get(key, db=self._db["failures"]))
        return bool(rec) and rec["size"] == entry.size and rec["mtime_ns"] == entry.mtime_ns

    def has_image(self, sha: str) -> bool:
        with self._begin(db=self._db["images"]) as txn:
            return txn.get(sha.encode()) is not None

    def image(self, sha: str) -> StoredImage | None:
        with self._begin(db=self._db["images"]) as txn:
            rec = _loads(txn.get(sha.encode()))
        return None if rec is None else _stored(sha, rec)

    def image_by_id(self, image_id: int) -> StoredImage | None:
        with self._begin(db=self._db["by_id"]) as txn:
            sha = txn.get(_id_key(image_id))
        return None if sha is None else self.image(bytes(sha).decode())

    def sha_for_path(self, path: str) -> str | None:
        with self._begin(db=self._db["paths"]) as txn:
            rec = _loads(txn.get(os.path.abspath(path).encode()))
        return None if rec is None else rec["sha"]

    def vector(self, image_id: int) -> FloatArray | None:
        with self._begin(db=self._db["vectors"]) as txn:
            raw = txn.get(_id_key(image_id))
        return None if raw is None else np.frombuffer(raw, dtype=np.float32).copy()

    def iter_vectors(self, chunk: int = 65536) -> Iterator[tuple[IdArray, FloatArray]]:
        """All (ids, vectors) in id order, `chunk` rows at a time, from one consistent snapshot."""
        dim = self.identity().dim
        with self._begin(db=self._db["vectors"], buffers=True) as txn:
            ids: list[int] = []
            buf = bytearray()
            for key, val in txn.cursor():
                ids.append(int.from_bytes(key, "big"))
                buf += val
                if len(ids) == chunk:
                    yield _chunk(ids, buf, dim)
                    ids, buf = [], bytearray()
            if ids:
                yield _chunk(ids, buf, dim)

    def snapshot(self) -> tuple[int, IdArray, FloatArray]:
        """(generation, ids, vectors) read in one transaction: consistent with each other."""
        dim = self.identity().dim
        with self._begin(buffers=True) as txn:
            gen = int(txn.get(b"generation", db=self._db["meta"]) or 0)
            n = txn.stat(self._db["vectors"])["entries"]
            ids = np.empty(n, np.int64)
            vecs = np.empty((n, dim), np.float32)
            for i, (key, val) in enumerate(txn.cursor(db=self._db["vectors"])):
                ids[i] = int.from_bytes(key, "big")
                vecs[i] = np.frombuffer(val, dtype=np.float32)
        return gen, ids, vecs

    def iter_paths(self) -> Iterator[str]:
        with self._begin(db=self._db["paths"]) as txn:
            yield from (bytes(k).decode() for k in txn.cursor().iternext(values=False))

    def iter_images(self) -> Iterator[StoredImage]:
        with self._begin(db=self._db["images"]) as txn:
            for k, v in txn.cursor():
                yield _stored(bytes(k).decode(), _loads(v))

    def iter_failures(self) -> Iterator[tuple[str, dict[str, Any]]]:
        with self._begin(db=self._db["failures"]) as txn:
            for k, v in txn.cursor():
                yield bytes(k).decode(), _loads(v)

    def counts(self) -> dict[str, int]:
        with self._begin() as txn:
            return {name: txn.stat(self._db[name])["entries"]
                    for name in ("vectors", "images", "paths", "failures", "labels")}

    # ---- labels (used by detection) ----------------------------------------------------------
    def put_labels(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        def fn(txn: lmdb.Transaction) -> None:
            for sha, rec in items:
                txn.put(sha.encode(), _dumps(rec), db=self._db["labels"])
        self._write(fn)

    def label(self, sha: str) -> dict[str, Any] | None:
        with self._begin(db=self._db["labels"]) as txn:
            return _loads(txn.get(sha.encode()))

    def iter_labels(self) -> Iterator[tuple[str, dict[str, Any]]]:
        with self._begin(db=self._db["labels"]) as txn:
            for k, v in txn.cursor():
                yield bytes(k).decode(), _loads(v)


    # ---- OCR results (indexer/ocr.py), keyed by "<sha256>|<engine id>" ---------------------------
    def put_ocr(self, items: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Store (sha256, engine id, OcrResult.to_dict()) records in one transaction."""
        def fn(txn: lmdb.Transaction) -> None:
            for sha, engine, rec in items:
                txn.put(f"{sha}|{engine}".encode(), _dumps(rec), db=self._db["ocr"])
        self._write(fn)

    def ocr(self, sha: str, engine: str) -> dict[str, Any] | None:
        if "ocr" not in self._db:
            return None
        with self._begin(db=self._db["ocr"]) as txn:
            return _loads(txn.get(f"{sha}|{engine}".encode()))

    def iter_ocr(self, engine: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(sha256, record) of every image read by `engine`."""
        if "ocr" not in self._db:
            return
        suffix = f"|{engine}"
        with self._begin(db=self._db["ocr"]) as txn:
            for k, v in txn.cursor():
                key = bytes(k).decode()
                if key.endswith(suffix):
                    yield key[: -len(suffix)], _loads(v)


def _chunk(ids: list[int], buf: bytearray, dim: int) -> tuple[IdArray, FloatArray]:
    return np.asarray(ids, np.int64), np.frombuffer(bytes(buf), np.float32).reshape(-1, dim)


def _stored(sha: str, rec: dict[str, Any]) -> StoredImage:
    return StoredImage(id=rec["id"], sha256=sha, paths=tuple(rec["paths"]), width=rec["width"],
                       height=rec["height"], format=rec["format"], size=rec["size"],
                       animated=rec["animated"], warnings=tuple(rec.get("warnings", ())))


def check_identity(stored: ModelIdentity, asked: ModelIdentity, where: str) -> None:
    diffs = stored.differences(asked)
    if diffs:
        raise ModelMismatchError(
            f"store {where} was built with a different model; refusing to mix vectors:\n  "
            + "\n  ".join(diffs)
            + "\nUse the store's own model (see `clipdex index info`) or build a new store."
        )
