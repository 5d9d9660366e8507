"""Normalise embeddings in float32 and refuse anything that is not a real unit vector."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .types import FloatArray

# Below this norm a vector carries no direction worth indexing (and would divide into noise).
MIN_NORM = 1e-6
BAD_EMBEDDING = "bad_embedding"


def normalize_rows(raw: FloatArray, dim: int) -> tuple[FloatArray, list[str | None]]:
    """L2-normalise each row; return the rows and, per row, None or why it was refused.

    Refused rows are zeroed in the output so that nothing downstream can use them by accident.
    """
    arr = np.asarray(raw, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != dim:
        why = f"wrong shape {arr.shape}, expected (n, {dim})"
        n = arr.shape[0] if arr.ndim >= 1 else 1
        return np.zeros((n, dim), np.float32), [why] * n
    with np.errstate(all="ignore"):
        finite: npt.NDArray[np.bool_] = np.asarray(np.isfinite(arr).all(axis=1))
        norms = np.linalg.norm(np.where(finite[:, None], arr, 0), axis=1).astype(np.float32)
        ok = finite & (norms >= MIN_NORM)
        out = np.zeros_like(arr)
        out[ok] = arr[ok] / norms[ok, None]
        # float32 overflow/underflow in the division could still leave a bad row
        ok &= np.isfinite(out).all(axis=1) & (np.abs(np.linalg.norm(out, axis=1) - 1) < 1e-3)
    out[~ok] = 0
    reasons: list[str | None] = []
    for i in range(len(arr)):
        if ok[i]:
            reasons.append(None)
        elif not finite[i]:
            reasons.append("non-finite values in embedding")
        else:
            reasons.append(f"embedding norm {float(norms[i]):.3g} below {MIN_NORM}")
    return out, reasons


def is_unit_rows(vecs: FloatArray, tol: float = 1e-3) -> bool:
    """True when every row is finite with norm 1 (the invariant of everything indexed)."""
    if vecs.size == 0:
        return True
    return bool(np.isfinite(vecs).all() and np.all(np.abs(np.linalg.norm(vecs, axis=1) - 1) < tol))
