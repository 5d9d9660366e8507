"""The text channel's classifier: character n-grams of the OCR text -> P(malicious).

Features come from a `HashingVectorizer` over character 3-5-grams (lower-cased, whitespace
collapsed): stateless, so there is no vocabulary to store, and robust to the OCR engine running
words together ("ignoreallprevious" shares most n-grams with "ignore all previous"). A
`LogisticRegression(class_weight="balanced")` on top; only its `coef_`/`intercept_` are saved,
as plain arrays in an `.npz` (read with `allow_pickle=False`) next to a JSON file holding the
vectorizer's parameters, the OCR engine id and the training counts.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from indexer.errors import ClassifierError

from .npzfile import publish_npz, read_npz

FORMAT_VERSION = 1
POINTER = "textclf.json"


@dataclass(frozen=True)
class TextSettings:
    """The vectorizer (must be identical at training and scoring) and the LR's strength."""

    ngram_min: int = 3
    ngram_max: int = 5
    n_features: int = 1 << 18
    # weak regularisation: with C around 50 the probabilities of separable texts are confident
    # (attacks mostly >= 0.93, benign text <= 0.1 in tests/test_ocr.py's synthetic set), so the
    # text channel can flag at the same operating point as the CLIP LR without calibration
    c: float = 50.0

    def __post_init__(self) -> None:
        if not 1 <= self.ngram_min <= self.ngram_max <= 8:
            raise ValueError("need 1 <= ngram_min <= ngram_max <= 8")
        if self.n_features < 1024 or self.n_features & (self.n_features - 1):
            raise ValueError("n_features must be a power of two >= 1024")
        if not self.c > 0:
            raise ValueError("c must be > 0")


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


@dataclass(frozen=True)
class Phrase:
    """A run of words from the image's text and how much it pushed the score (logit units)."""

    text: str
    weight: float


class TextClassifier:
    def __init__(self, coef: npt.NDArray[np.float32], intercept: float, settings: TextSettings,
                 meta: dict[str, Any] | None = None) -> None:
        if coef.shape != (settings.n_features,):
            raise ClassifierError(f"text classifier has {coef.shape} weights for "
                                  f"{settings.n_features} features")
        self.coef = np.asarray(coef, np.float32)
        self.intercept = float(intercept)
        self.settings = settings
        self.meta = dict(meta or {})

    def _vectorizer(self, norm: str | None = "l2") -> Any:
        return vectorizer(self.settings, norm)

    @classmethod
    def fit(cls, texts: list[str], labels: list[int], settings: TextSettings,
            meta: dict[str, Any] | None = None) -> TextClassifier:
        from sklearn.linear_model import LogisticRegression

        if set(labels) != {0, 1}:
            raise ClassifierError("the text channel needs OCR text from both labels")
        x = vectorizer(settings).transform([normalize_text(t) for t in texts])
        lr = LogisticRegression(class_weight="balanced", max_iter=2000, C=settings.c)
        lr.fit(x, np.asarray(labels))
        return cls(lr.coef_[0].astype(np.float32), float(lr.intercept_[0]), settings, meta)

    def probability(self, texts: list[str]) -> npt.NDArray[np.float64]:
        """P(malicious) per text; callers decide what an empty text means (no text channel)."""
        if not texts:
            return np.zeros(0)
        x = self._vectorizer().transform([normalize_text(t) for t in texts])
        z = np.asarray(x @ self.coef.astype(np.float64)).reshape(-1) + self.intercept
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -500, 500))))

    def phrases(self, text: str, top: int = 5) -> list[Phrase]:
        """Runs of consecutive words whose n-grams pushed the score up most (then down most)."""
        words = normalize_text(text).split(" ")
        if not words or words == [""]:
            return []
        counts = self._vectorizer(None)
        full = counts.transform([" ".join(words)])
        norm = float(np.sqrt(full.multiply(full).sum())) or 1.0
        per_word = np.asarray(counts.transform(words) @ self.coef.astype(np.float64)
                              ).reshape(-1) / norm
        runs = _runs(words, per_word)
        runs.sort(key=lambda p: -abs(p.weight))
        return runs[:top]

    # ---- files ---------------------------------------------------------------------------
    def save(self, folder: str) -> str:
        def metadata(name: str, digest: str) -> dict[str, Any]:
            return {"format_version": FORMAT_VERSION, "arrays": name, "arrays_sha256": digest,
                    "settings": asdict(self.settings), "saved_at": time.time(), **self.meta}

        return publish_npz(folder, "textclf", POINTER, metadata, coef=self.coef,
                           intercept=np.array([self.intercept]))


def vectorizer(settings: TextSettings, norm: str | None = "l2") -> Any:
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(analyzer="char", ngram_range=(settings.ngram_min, settings.ngram_max),
                             n_features=settings.n_features, alternate_sign=False, norm=norm,
                             lowercase=True)


def _runs(words: list[str], weights: npt.NDArray[np.float64]) -> list[Phrase]:
    """Group consecutive words with the same sign of weight into phrases."""
    out: list[Phrase] = []
    start = 0
    for i in range(1, len(words) + 1):
        if i == len(words) or np.sign(weights[i]) != np.sign(weights[start]):
            out.append(Phrase(" ".join(words[start:i]), float(weights[start:i].sum())))
            start = i
    return out


def load_text_classifier(folder: str) -> TextClassifier | None:
    """The saved text classifier, None when none was trained; ClassifierError when unsafe."""
    path = os.path.join(folder, POINTER)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError) as err:
        raise ClassifierError(f"{path} is not JSON text-classifier metadata: {err}") from err
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ClassifierError(f"{path}: unknown text-classifier format; retrain")
    arrays = read_npz(os.path.join(folder, str(meta["arrays"])), str(meta["arrays_sha256"]),
                      ("coef", "intercept"), "text-classifier arrays")
    try:
        settings = TextSettings(**meta["settings"])
    except (TypeError, ValueError) as err:
        raise ClassifierError(f"{path}: inconsistent settings: {err}") from err
    keep = {k: v for k, v in meta.items() if k in ("engine", "counts", "trained_at")}
    return TextClassifier(arrays["coef"].reshape(-1), float(arrays["intercept"].reshape(-1)[0]),
                          settings, keep)


@dataclass(frozen=True)
class TextMeta:
    engine: str
    counts: dict[str, Any] = field(default_factory=dict)
    trained_at: float = field(default_factory=time.time)
