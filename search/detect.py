"""The hybrid malicious-image detector: a LogisticRegression plus a kNN vote over labelled images.

Combination rule (defaults in `DetectSettings`; README "Detection" explains it for users):

    lr    = P(malicious) of a LogisticRegression(class_weight="balanced") on the unit vector
    vote  = sum(w_i * y_i) / sum(w_i) over the k nearest labelled images, w_i = max(sim_i, 0)
    blend = lr_weight * lr + (1 - lr_weight) * vote
    score = 1.0 if similarity to the nearest known-malicious image >= near_copy, else blend
    flagged = score >= threshold

With a text channel (search/textclf.py) and an image whose OCR found text (text = P(malicious)
of the text classifier), the blend becomes `max(blend, text)` (text_rule "max": either channel
flags alone) or `(1 - text_weight) * blend + text_weight * text` (text_rule "mean"); an image
without text keeps the CLIP-only blend.

The classifier is stored without pickle: arrays in an `.npz` read with `allow_pickle=False`, and
JSON metadata (model identity, dimension, classes, counts, settings, reference images). The
reference set (the labelled training vectors the kNN searches) is a snapshot taken at training.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from indexer.embed import IDENTITY_KEYS, ModelIdentity
from indexer.errors import ClassifierError, QueryError
from indexer.store import Store
from indexer.types import FloatArray
from indexer.vectors import is_unit_rows

from .npzfile import publish_npz, read_npz

FORMAT_VERSION = 1
DETECTOR_DIR = "detector"
POINTER = "detector.json"
MALICIOUS, BENIGN = 1, 0
_NPZ_KEYS = ("coef", "intercept", "classes", "ref_vectors", "ref_labels")


@dataclass(frozen=True)
class DetectSettings:
    """How the two detectors are combined, and where each one flags."""

    k: int = 10  # labelled neighbours in the vote
    lr_weight: float = 0.5  # share of the LR probability in the blend; the vote gets the rest
    near_copy: float | None = 0.95  # similarity to a known-malicious image that flags alone
    threshold: float = 0.93  # hybrid score at or above which an image is flagged
    lr_threshold: float = 0.93  # LR alone (the reference detector's operating point)
    knn_threshold: float = 0.5  # kNN vote alone (majority of the weighted neighbours)
    c: float = 1.0  # LogisticRegression's inverse regularisation strength (sklearn default)
    # Text channel (search/ocr_app.py): only used when the image shows text and a text
    # classifier is trained; see `combine`.
    text_rule: str = "max"  # "max": either channel flags alone; "mean": weighted mean
    text_weight: float = 0.5  # share of the text score in the "mean" rule
    text_threshold: float = 0.93  # the text channel alone (detect eval)

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        _check_range("lr_weight", self.lr_weight, 0.0, 1.0)
        if self.near_copy is not None:
            _check_range("near_copy", self.near_copy, -1.0, 1.0)
        _check_range("text_weight", self.text_weight, 0.0, 1.0)
        if self.text_rule not in ("max", "mean"):
            raise ValueError(f"text_rule must be 'max' or 'mean', got {self.text_rule!r}")
        for name in ("threshold", "lr_threshold", "knn_threshold", "text_threshold"):
            _check_range(name, getattr(self, name), 0.0, 1.0 + 1e-6)
        if not np.isfinite(self.c) or self.c <= 0:
            raise ValueError(f"c must be > 0, got {self.c!r}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class Neighbour:
    path: str
    label: int
    category: str | None
    similarity: float


@dataclass(frozen=True)
class Verdict:
    score: float
    flagged: bool
    lr_probability: float
    knn_vote: float
    nearest_malicious: float | None
    neighbours: list[Neighbour]
    threshold: float
    # Text channel (None: no text channel trained, or the image shows no text)
    text_probability: float | None = None
    ocr_text: str | None = None
    text_phrases: list[tuple[str, float]] = field(default_factory=list)  # (phrase, logit push)


def verdict_to_dict(v: Verdict) -> dict[str, Any]:
    """The JSON shape of a verdict (used by `detect run --json` and the HTTP server)."""
    d = asdict(v)
    if v.text_probability is None and v.ocr_text is None:  # no text channel: the original shape
        for key in ("text_probability", "ocr_text", "text_phrases"):
            d.pop(key)
    return d


@dataclass(frozen=True)
class Reference:
    """The labelled vectors the kNN part searches (the training images)."""

    vectors: FloatArray
    labels: npt.NDArray[np.int8]
    categories: tuple[str | None, ...]
    paths: tuple[str, ...]
    shas: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.vectors)
        if self.vectors.ndim != 2 or not all(
                len(x) == n for x in (self.labels, self.categories, self.paths, self.shas)):
            raise ValueError("reference arrays disagree in length")
        if not set(np.unique(self.labels).tolist()) <= {BENIGN, MALICIOUS}:
            raise ValueError("labels must be 0 (benign) or 1 (malicious)")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


class Detector:
    """A fitted LR (plain arrays) and the labelled reference set, scored together."""

    def __init__(self, coef: npt.NDArray[np.float64], intercept: float, reference: Reference,
                 settings: DetectSettings, meta: dict[str, Any]) -> None:
        if coef.shape != (reference.dim,):
            raise ClassifierError(f"classifier has {coef.shape} weights for dimension "
                                  f"{reference.dim}")
        self.coef = coef
        self.intercept = float(intercept)
        self.reference = reference
        self.settings = settings
        self.meta = meta
        self._index = _flat_index(reference.vectors)
        self._malicious = _flat_index(reference.vectors[reference.labels == MALICIOUS])

    @property
    def dim(self) -> int:
        return self.reference.dim

    @classmethod
    def fit(cls, reference: Reference, settings: DetectSettings,
            meta: dict[str, Any] | None = None) -> Detector:
        """Fit the LR on the reference vectors (validated unit vectors, both labels present)."""
        from sklearn.linear_model import LogisticRegression

        if set(np.unique(reference.labels).tolist()) != {BENIGN, MALICIOUS}:
            raise ClassifierError("training needs images of both labels (0 benign, 1 malicious)")
        _check_unit(reference.vectors, reference.dim)
        lr = LogisticRegression(class_weight="balanced", max_iter=2000, C=settings.c)
        lr.fit(reference.vectors, reference.labels)
        if list(lr.classes_) != [BENIGN, MALICIOUS]:
            raise ClassifierError(f"unexpected classes {lr.classes_}")
        return cls(lr.coef_[0].astype(np.float64), float(lr.intercept_[0]), reference, settings,
                   dict(meta or {}))

    def with_settings(self, settings: DetectSettings) -> Detector:
        """The same fitted detector with other combination settings (no refit)."""
        return Detector(self.coef, self.intercept, self.reference, settings, dict(self.meta))

    # ---- scoring ---------------------------------------------------------------------------
    def lr_probability(self, vecs: FloatArray) -> npt.NDArray[np.float64]:
        z = np.asarray(vecs, np.float64) @ self.coef + self.intercept
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -500, 500))))

    def score_vectors(self, vecs: FloatArray) -> list[Verdict]:
        """One verdict per row; rows must be finite unit vectors of the detector's dimension."""
        q = _check_unit(np.atleast_2d(np.asarray(vecs, np.float32)), self.dim)
        if len(q) == 0:
            return []
        lr = self.lr_probability(q)
        sims, idx = self._index.search(q, min(self.settings.k, self._index.ntotal))
        nearest = self._nearest_malicious(q)
        return [self._verdict(float(lr[i]), sims[i], idx[i], nearest[i]) for i in range(len(q))]

    def _nearest_malicious(self, q: FloatArray) -> list[float | None]:
        if self._malicious.ntotal == 0:
            return [None] * len(q)
        sims, _ = self._malicious.search(q, 1)
        return [float(s) for s in sims[:, 0]]

    def _verdict(self, lr: float, sims: FloatArray, idx: npt.NDArray[np.int64],
                 nearest: float | None) -> Verdict:
        s = self.settings
        vote = knn_vote(sims, self.reference.labels[idx])
        score = combine(lr, vote, nearest, s)
        return Verdict(score=score, flagged=score >= s.threshold, lr_probability=lr,
                       knn_vote=vote, nearest_malicious=nearest,
                       neighbours=[self._neighbour(int(j), float(x))
                                   for j, x in zip(idx, sims, strict=True)],
                       threshold=s.threshold)

    def _neighbour(self, j: int, similarity: float) -> Neighbour:
        r = self.reference
        return Neighbour(r.paths[j], int(r.labels[j]), r.categories[j], similarity)

    # ---- files -----------------------------------------------------------------------------
    def save(self, folder: str) -> str:
        """Publish arrays then the JSON pointer, each atomically; return the pointer's path."""
        return publish_npz(folder, "detector", POINTER, self._metadata, coef=self.coef,
                           intercept=np.array([self.intercept]),
                           classes=np.array([BENIGN, MALICIOUS], np.int64),
                           ref_vectors=self.reference.vectors, ref_labels=self.reference.labels)

    def _metadata(self, npz_name: str, digest: str) -> dict[str, Any]:
        r = self.reference
        return {"format_version": FORMAT_VERSION, "arrays": npz_name, "arrays_sha256": digest,
                "dim": self.dim, "classes": [BENIGN, MALICIOUS],
                "settings": asdict(self.settings), "saved_at": time.time(), **self.meta,
                "reference": {"paths": list(r.paths), "categories": list(r.categories),
                              "sha256": list(r.shas)}}


def combine(lr: float, vote: float, nearest_malicious: float | None,
            settings: DetectSettings, text: float | None = None) -> float:
    """The hybrid score (see the module docstring); `text` None = no text channel/no text."""
    if (settings.near_copy is not None and nearest_malicious is not None
            and nearest_malicious >= settings.near_copy):
        return 1.0
    blend = float(settings.lr_weight * lr + (1.0 - settings.lr_weight) * vote)
    if text is None:
        return blend
    if settings.text_rule == "max":
        return max(blend, float(text))
    return float((1.0 - settings.text_weight) * blend + settings.text_weight * text)


def knn_vote(sims: FloatArray, labels: npt.NDArray[np.int8]) -> float:
    """Similarity-weighted share of malicious neighbours (plain share if no weight is > 0)."""
    w = np.maximum(np.asarray(sims, np.float64), 0.0)
    y = np.asarray(labels, np.float64)
    if len(y) == 0:
        return 0.0
    return float((w @ y) / w.sum()) if w.sum() > 0 else float(y.mean())


def _flat_index(vecs: FloatArray) -> Any:
    import faiss

    index = faiss.IndexFlatIP(vecs.shape[1])
    if len(vecs):
        index.add(np.ascontiguousarray(vecs, np.float32))
    return index


def _check_unit(vecs: FloatArray, dim: int) -> FloatArray:
    if vecs.ndim != 2 or vecs.shape[1] != dim:
        raise ClassifierError(f"vectors have shape {vecs.shape}; the detector expects (n, {dim})")
    if not is_unit_rows(vecs):
        raise QueryError("vectors must be finite unit vectors (validated embeddings)")
    return np.ascontiguousarray(vecs, np.float32)


# ---- loading -----------------------------------------------------------------------------------
def detector_dir(store: Store) -> str:
    return os.path.join(store.path, DETECTOR_DIR)


def load_detector(store: Store, folder: str | None = None) -> Detector:
    """The store's trained detector; ClassifierError when missing, unsafe or incompatible."""
    folder = folder or detector_dir(store)
    meta = _read_pointer(folder)
    check_compatible(meta, store.identity())
    arrays = read_npz(os.path.join(folder, str(meta["arrays"])), str(meta["arrays_sha256"]),
                      _NPZ_KEYS, "detector arrays")
    return _from_parts(meta, arrays)


def save_detector(store: Store, detector: Detector) -> str:
    return detector.save(detector_dir(store))


def _read_pointer(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, POINTER)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ClassifierError(f"no trained detector at {folder}; run `clipdex detect train` "
                              "first (nothing was scanned)") from None
    except OSError as err:
        raise ClassifierError(f"cannot read {path}: {err}") from err
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise ClassifierError(f"{path} is not JSON detector metadata (a pickle or another "
                              "format is refused, never loaded)") from err
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ClassifierError(f"{path}: unknown detector format; retrain with this clipdex")
    return meta


def check_compatible(meta: dict[str, Any], identity: ModelIdentity) -> None:
    """The detector was trained on vectors of exactly the store's model and dimension."""
    trained = meta.get("model") or {}
    if meta.get("dim") != identity.dim:
        raise ClassifierError(f"detector dimension {meta.get('dim')} != store dimension "
                              f"{identity.dim}; retrain with `clipdex detect train`")
    ours = identity.to_dict()
    diffs = [f"{k}: {trained.get(k)!r} != {ours[k]!r}" for k in IDENTITY_KEYS
             if trained.get(k) != ours[k]]
    if diffs:
        raise ClassifierError("detector was trained on another model's vectors:\n  "
                              + "\n  ".join(diffs) + "\nretrain with `clipdex detect train`")


def _from_parts(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Detector:
    dim = int(meta["dim"])
    vecs = arrays["ref_vectors"].astype(np.float32)
    if list(arrays["classes"]) != [BENIGN, MALICIOUS] or vecs.ndim != 2 or vecs.shape[1] != dim:
        raise ClassifierError(f"detector arrays do not match dimension {dim} / classes [0, 1]")
    ref = meta["reference"]
    try:
        reference = Reference(vecs, arrays["ref_labels"].astype(np.int8),
                              tuple(ref["categories"]), tuple(ref["paths"]),
                              tuple(ref["sha256"]))
        settings = DetectSettings(**meta["settings"])
    except (TypeError, ValueError, KeyError) as err:
        raise ClassifierError(f"detector metadata is inconsistent: {err}") from err
    keep = {k: v for k, v in meta.items() if k in _META_KEYS}
    return Detector(arrays["coef"].astype(np.float64).reshape(-1),
                    float(arrays["intercept"].reshape(-1)[0]), reference, settings, keep)


_META_KEYS = ("model", "counts", "validation", "holdout", "seed", "trained_at", "calibration",
              "versions")


@dataclass(frozen=True)
class TrainMeta:
    """What `detect train` records next to the arrays."""

    model: dict[str, Any]
    counts: dict[str, Any]
    holdout: float
    seed: int
    validation: list[str] = field(default_factory=list)  # sha256 of held-out labelled images
    trained_at: float = field(default_factory=time.time)

    def as_meta(self) -> dict[str, Any]:
        return asdict(self)


def with_thresholds(detector: Detector, thresholds: dict[str, float]) -> Detector:
    """The same detector flagging at other thresholds (keys: DetectSettings threshold fields)."""
    fields: dict[str, Any] = dict(thresholds)
    return detector.with_settings(replace(detector.settings, **fields))
