"""Decode workers: read, hash, decode and preprocess files in separate processes.

A decoder that segfaults or hangs costs only its own file: each worker holds one chunk at a
time; when a worker dies or overruns its deadline, the chunk's files are retried one by one in
fresh workers, and only the file that fails alone is quarantined (`worker_crash` / `timeout`).
We do not use ProcessPoolExecutor (one crash breaks the whole pool) nor multiprocessing.Pool
(a crash hangs it).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from PIL import Image

from .decode import DecodeLimits
from .errors import DecodeError
from .types import Decoded, Failure, FloatArray, ScanEntry

log = logging.getLogger(__name__)

# Test-only hooks: a worker aborts / hangs on a file whose path contains this text. They let the
# reliability tests simulate a decoder crash without shipping a crashing image.
CRASH_HOOK = "CLIPDEX_TEST_CRASH_ON"
HANG_HOOK = "CLIPDEX_TEST_HANG_ON"


@dataclass(frozen=True)
class Known:
    """A file whose bytes the store already holds: it needs a new path record, not the model."""

    entry: ScanEntry
    sha256: str


Result = Decoded | Failure | Known


@dataclass(frozen=True)
class WorkerConfig:
    preprocess: Callable[[Image.Image], FloatArray]
    limits: DecodeLimits
    min_side: int | None
    store_path: str | None = None  # lets a worker skip decoding bytes the store already has
    # Another per-file job for the same crash-isolated pool (e.g. indexer.ocr.ocr_task); it is
    # called as task(entry, cfg, known) and must return something with `.entry` or a Failure.
    task: Callable[[ScanEntry, Any, Callable[[str], bool]], Any] | None = None
    # Added to the workers' nice value: the model keeps its cores while it is busy, and the
    # workers use whatever it leaves (its start-up, GIL and OpenMP gaps) to decode ahead.
    nice: int = 0


def _known_checker(store_path: str | None) -> Callable[[str], bool]:
    if not store_path:
        return lambda sha: False
    from .store import Store

    # Read-only, in this (spawned) process; Store's reads adopt a map the writer has grown.
    return Store.open(store_path, readonly=True).has_image


def process_file(entry: ScanEntry, cfg: WorkerConfig, known: Callable[[str], bool]) -> Result:
    """Everything a worker does for one file; never raises for a bad file."""
    _test_hooks(entry.path)
    try:
        from .decode import decode_bytes, read_file

        data = read_file(entry.path, cfg.limits)
        import hashlib

        sha = hashlib.sha256(data).hexdigest()
        if known(sha):
            return Known(entry, sha)
        image, meta = decode_bytes(data, cfg.limits, cfg.min_side, sha256=sha)
        pixels = cfg.preprocess(image)
        return Decoded(entry=entry, meta=meta, pixels=pixels)
    except DecodeError as err:
        return Failure(entry.path, err.reason, err.message, entry.size, entry.mtime_ns)
    except Exception as err:  # preprocessing bugs must not kill the run either
        return Failure(entry.path, "corrupt", f"{type(err).__name__}: {err}", entry.size,
                       entry.mtime_ns)


def _test_hooks(path: str) -> None:
    crash, hang = os.environ.get(CRASH_HOOK), os.environ.get(HANG_HOOK)
    if crash and crash in path:
        os.abort()
    if hang and hang in path:
        time.sleep(3600)


def _worker_main(conn: Connection, cfg: WorkerConfig) -> None:
    if cfg.nice:
        try:
            os.nice(cfg.nice)
        except OSError:  # some sandboxes refuse; a worker at normal priority still works
            pass
    known = _known_checker(cfg.store_path)
    conn.send("ready")
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        task = cfg.task or process_file
        conn.send([task(e, cfg, known) for e in chunk])


class _Worker:
    def __init__(self, ctx: Any, cfg: WorkerConfig) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, cfg), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.chunk: list[ScanEntry] | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def _path_of(result: Result) -> str:
    return result.path if isinstance(result, Failure) else result.entry.path


class _InOrder:
    """Reorder buffer: results come back in the order their entries went in.

    Workers finish out of order; committing in input (scan) order makes image ids, and so a
    whole build, reproducible, also when a killed build is resumed. `window` bounds how many
    entries may be handed out ahead of the oldest unfinished one (memory stays flat).
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.order: deque[str] = deque()
        self.done: dict[str, list[Result]] = {}  # a list: a caller may repeat a path

    def full(self) -> bool:
        return len(self.order) >= self.window

    def add(self, result: Result) -> Iterator[Result]:
        self.done.setdefault(_path_of(result), []).append(result)
        while self.order and self.order[0] in self.done:
            path = self.order.popleft()
            waiting = self.done[path]
            yield waiting.pop(0)
            if not waiting:
                del self.done[path]


class DecodePool:
    """Run `process_file` over entries in `workers` processes; yields results in input order."""

    def __init__(self, cfg: WorkerConfig, workers: int, chunk: int = 8,
                 file_timeout: float = 60.0, start_timeout: float = 120.0,
                 window: int | None = None) -> None:
        self.cfg = cfg
        self.n = max(1, workers)
        self.chunk = max(1, chunk)
        self.window = window or 4 * self.n * self.chunk
        self.file_timeout = file_timeout
        self.start_timeout = start_timeout
        self._ctx = mp.get_context("spawn")  # never fork a process holding LMDB/torch state

    def map(self, entries: Iterable[ScanEntry]) -> Iterator[Result]:
        it = iter(entries)
        first = next(it, None)
        if first is None:
            return  # nothing to decode: do not pay for starting workers
        it = itertools.chain([first], it)
        retry: deque[list[ScanEntry]] = deque()
        workers = [self._spawn() for _ in range(self.n)]
        exhausted = False
        ordered = _InOrder(self.window)
        try:
            while True:
                exhausted = self._feed(workers, it, retry, exhausted, ordered)
                busy = [w for w in workers if w.chunk is not None or not w.ready]
                if not busy and exhausted and not retry:
                    return
                for result in self._collect(workers, retry):
                    yield from ordered.add(result)
        finally:
            for w in workers:
                if w.proc.is_alive() and w.chunk is None and w.ready:
                    try:
                        w.conn.send(None)
                    except OSError:
                        pass
                w.kill()

    def _spawn(self) -> _Worker:
        w = _Worker(self._ctx, self.cfg)
        w.deadline = time.monotonic() + self.start_timeout
        return w

    def _next_chunk(self, it: Iterator[ScanEntry], retry: deque[list[ScanEntry]],
                    ordered: _InOrder) -> list[ScanEntry] | None:
        if retry:
            return retry.popleft()
        chunk = [e for _, e in zip(range(self.chunk), it, strict=False)]
        ordered.order.extend(e.path for e in chunk)
        return chunk or None

    def _feed(self, workers: list[_Worker], it: Iterator[ScanEntry],
              retry: deque[list[ScanEntry]], exhausted: bool, ordered: _InOrder) -> bool:
        for w in workers:
            if not w.ready or w.chunk is not None:
                continue
            if not retry and ordered.full():
                break  # wait for the oldest file before reading further ahead
            chunk = self._next_chunk(it, retry, ordered) if (retry or not exhausted) else None
            if chunk is None:
                exhausted = exhausted or not retry
                continue
            w.chunk = chunk
            w.deadline = time.monotonic() + self.file_timeout * len(chunk)
            w.conn.send(chunk)
        return exhausted

    def _collect(self, workers: list[_Worker], retry: deque[list[ScanEntry]]) -> Iterator[Result]:
        now = time.monotonic()
        # Idle workers have no deadline: they may wait for the oldest file (see _InOrder).
        deadlines = [w.deadline for w in workers if w.chunk is not None or not w.ready]
        timeout = max(0.0, min(deadlines) - now) if deadlines else 0.1
        ready = wait([w.conn for w in workers] + [w.proc.sentinel for w in workers],
                     timeout=timeout)
        for i, w in enumerate(workers):
            if w.conn in ready:
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    msg = None
                if msg == "ready":
                    w.ready = True
                    continue
                if isinstance(msg, list):
                    w.chunk = None
                    yield from msg
                    continue
            died = w.proc.sentinel in ready and not w.proc.is_alive()
            late = (w.chunk is not None or not w.ready) and time.monotonic() > w.deadline
            if died or late:
                yield from self._replace(workers, i, retry, "worker_crash" if died else "timeout")

    def _replace(self, workers: list[_Worker], i: int, retry: deque[list[ScanEntry]],
                 reason: str) -> Iterator[Result]:
        w = workers[i]
        chunk = w.chunk
        code = w.proc.exitcode
        w.kill()
        workers[i] = self._spawn()
        if chunk is None:
            if not w.ready:
                raise RuntimeError(f"decode worker failed to start (exit code {code})")
            return
        if len(chunk) > 1:
            log.warning("decode worker %s (%s); retrying %d files one by one", reason, code,
                        len(chunk))
            retry.extendleft([[e] for e in reversed(chunk)])
            return
        e = chunk[0]
        msg = (f"decoder process died (exit code {code})" if reason == "worker_crash"
               else f"decoding took longer than {self.file_timeout:.0f}s")
        yield Failure(e.path, reason, msg, e.size, e.mtime_ns)


def iter_in_thread(source: Iterator[Any], lookahead: int, idle: Any = None) -> Iterator[Any]:
    """Run a generator in a thread with a bounded queue, so decoding overlaps the model.

    With `idle` set, that object is yielded whenever the consumer has drained the queue and
    would have to wait: the consumer may then act on what it holds instead of idling.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, lookahead))
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
        except BaseException as err:  # re-raised in the consumer
            q.put(_Raised(err))
        finally:
            if hasattr(source, "close"):
                source.close()
            q.put(done)

    t = threading.Thread(target=run, name="clipdex-decode", daemon=True)
    t.start()
    try:
        while True:
            try:
                item = q.get_nowait() if idle is not None else q.get()
            except queue.Empty:
                yield idle
                item = q.get()
            if item is done:
                break
            if isinstance(item, _Raised):
                raise item.err
            yield item
    finally:
        stop.set()  # the producer notices within 0.2 s of its next put; no join (it may be
        # waiting on a slow decode, and its daemon workers die with the process anyway)


@dataclass
class _Raised:
    err: BaseException
