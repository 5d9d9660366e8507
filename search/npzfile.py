"""Trained arrays on disk (detector, text classifier): an .npz named by its sha256, published
before the JSON pointer that names it, and read back only when the bytes match that sha256 and
hold no pickled objects.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from indexer.atomic import publish_bytes
from indexer.errors import ClassifierError

_ZIP_MAGIC = b"PK\x03\x04"


def publish_npz(folder: str, prefix: str, pointer: str,
                metadata: Callable[[str, str], dict[str, Any]], **arrays: Any) -> str:
    """Write `<prefix>-<sha>.npz`, then `pointer` with `metadata(npz name, sha256)`, each
    atomically; drop older `<prefix>-*.npz`. Returns the pointer's path."""
    os.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    name = f"{prefix}-{digest[:16]}.npz"
    publish_bytes(os.path.join(folder, name), data)
    path = os.path.join(folder, pointer)
    publish_bytes(path, json.dumps(metadata(name, digest), indent=1).encode())
    for old in os.listdir(folder):
        if old.startswith(f"{prefix}-") and old.endswith(".npz") and old != name:
            try:
                os.unlink(os.path.join(folder, old))
            except OSError:
                pass
    return path


def read_npz(path: str, digest: str, keys: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """The arrays `keys` of the .npz at `path`; ClassifierError unless its sha256 is `digest`
    and it is a plain (pickle-free) .npz."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ClassifierError(f"cannot read {what} {path}: {err}") from err
    if not data.startswith(_ZIP_MAGIC):
        raise ClassifierError(f"{path} is not an .npz archive (pickles are refused)")
    if hashlib.sha256(data).hexdigest() != digest:
        raise ClassifierError(f"{path} does not match its metadata (sha256); retrain")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in keys}
    except (ValueError, KeyError, OSError) as err:  # object arrays raise ValueError here
        raise ClassifierError(f"{path}: unusable {what} ({err})") from err
