"""Atomic file publication: write a temp file, fsync it, rename over the target, fsync the dir."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator


def fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temp_beside(target: str) -> Iterator[str]:
    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(target), dir=folder)
    os.close(fd)
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)  # failed before the rename: leave nothing behind


def publish(target: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then make `target` appear whole or not at all."""
    with _temp_beside(target) as tmp:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    fsync_dir(os.path.dirname(os.path.abspath(target)))


def publish_bytes(target: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    publish(target, write)
