"""Find candidate image files under the given roots, lazily and without hanging on odd files."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator

from .types import Failure, ScanEntry

log = logging.getLogger(__name__)

# Names we pick up. Allowed formats are decided by content in decode.py; extensions of formats
# we refuse are still picked up so the user sees them quarantined instead of silently ignored.
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .webp .gif .bmp .dib "
    ".tif .tiff .psd .eps .pdf .jp2 .j2k .ico .tga .pcx .dds .fits .sgi .heic .avif".split()
)
STORE_SUFFIX = ".clipdex"


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _entry_for_link(path: str, real_roots: list[str]) -> ScanEntry | Failure:
    try:
        target = os.path.realpath(path, strict=True)
        st = os.stat(target)
    except (OSError, RuntimeError) as err:  # loops and dangling links
        return Failure(path, "io_error", f"broken symlink: {err}")
    if not _inside(target, real_roots):
        return Failure(path, "io_error", f"symlink leaves the scanned roots -> {target}")
    return _entry_for_stat(path, st)


def _entry_for_stat(path: str, st: os.stat_result) -> ScanEntry | Failure:
    if not stat.S_ISREG(st.st_mode):
        return Failure(path, "io_error", "not a regular file (FIFO, socket or device)")
    return ScanEntry(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)


def _walk_one(root: str, real_roots: list[str]) -> Iterator[ScanEntry | Failure]:
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            yield Failure(folder, "io_error", f"cannot list directory: {err}")
            continue
        for e in entries:
            yield from _visit(e, stack, real_roots)


def _visit(e: os.DirEntry[str], stack: list[str], real_roots: list[str]
           ) -> Iterator[ScanEntry | Failure]:
    try:
        if e.is_dir(follow_symlinks=False):
            if not e.name.endswith(STORE_SUFFIX):
                stack.append(e.path)
            return
        if not _is_image_name(e.name):
            return
        if e.is_symlink():
            yield _entry_for_link(e.path, real_roots)
        else:
            yield _entry_for_stat(e.path, e.stat(follow_symlinks=False))
    except OSError as err:
        yield Failure(e.path, "io_error", str(err))


def scan(roots: Iterable[str]) -> Iterator[ScanEntry | Failure]:
    """Yield each candidate file once (absolute path), or a Failure for files we cannot take.

    Directories are walked in name order; symlinked directories are not followed (no loops).
    """
    abs_roots = [os.path.abspath(r) for r in roots]
    real_roots = [os.path.realpath(r) for r in abs_roots]
    seen: set[str] = set()
    for root in abs_roots:
        if os.path.isfile(root):
            items: Iterator[ScanEntry | Failure] = iter([_entry_for_stat(root, os.stat(root))])
        elif not os.path.isdir(root):
            items = iter([Failure(root, "io_error", "no such file or directory")])
        else:
            items = _walk_one(root, real_roots)
        for item in items:
            if item.path not in seen:
                seen.add(item.path)
                yield item
