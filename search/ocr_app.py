"""Wiring for the OCR channel: read stored images once, train/apply the text classifier, and
find images by the text they show.

OCR results live in the store (`ocr` sub-db) keyed by sha256 + engine id: `index build --ocr`
fills them, `detect train --ocr` fills the labelled images it lacks, and every later use reads
them back. Files that are not in the store (`detect run` on new files) are read at run time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from indexer.errors import ClassifierError
from indexer.ocr import DEFAULT_ENGINE, OcrItem, OcrPool, OcrResult, read_file, shared_engine
from indexer.store import Store
from indexer.types import ScanEntry

from .detect import DetectSettings, Verdict, combine, detector_dir
from .metrics import EvalReport, evaluate
from .textclf import POINTER as TEXT_POINTER
from .textclf import TextClassifier, TextMeta, TextSettings, load_text_classifier

OcrProgress = Callable[[int, int], None]  # (done, total)
_FLUSH = 16  # OCR results per store transaction: a killed run loses at most this many


# ---- reading and caching -------------------------------------------------------------------------
@dataclass(frozen=True)
class OcrSummary:
    total: int  # stored images
    cached: int  # already read by this engine
    read: int  # read now
    with_text: int
    failed: int  # the engine could not read them: stored as "no text" with the reason
    engine: str


def ocr_images(store: Store, items: list[tuple[str, str]], engine: str = DEFAULT_ENGINE,
               workers: int = 2, on_progress: OcrProgress | None = None,
               save: bool = False) -> dict[str, OcrResult]:
    """OcrResult per sha for (sha, path) items: from the store, else read now (in workers);
    with `save` (a writable store) new results are stored, so no image is read twice."""
    engine_id = shared_engine(engine).engine_id
    out: dict[str, OcrResult] = {}
    todo: list[OcrItem] = []
    for sha, path in dict(items).items():
        rec = store.ocr(sha, engine_id)
        if rec is not None:
            out[sha] = OcrResult.from_dict(rec)
        else:
            todo.append(OcrItem(ScanEntry(path, 0, 0), sha))
    batch: list[tuple[str, str, dict[str, object]]] = []
    for item, res in _read(todo, engine, workers, on_progress):
        out[item.sha256] = res
        if not (res.error or "").startswith("timeout"):  # a busy machine may do better later
            batch.append((item.sha256, engine_id, res.to_dict()))
        if save and len(batch) >= _FLUSH:
            store.put_ocr(batch)
            batch = []
    if save and batch:
        store.put_ocr(batch)
    return out


def _read(todo: list[OcrItem], engine: str, workers: int, on_progress: OcrProgress | None
          ) -> Iterator[tuple[OcrItem, OcrResult]]:
    if len(todo) <= 1 or workers <= 1:  # spawning workers costs more than one image
        eng = shared_engine(engine)
        for n, item in enumerate(todo, 1):
            yield item, read_file(item.entry.path, eng)
            if on_progress:
                on_progress(n, len(todo))
        return
    pool = OcrPool(engine, min(workers, len(todo)))
    for n, pair in enumerate(pool.map(todo), 1):
        yield pair
        if on_progress:
            on_progress(n, len(todo))


def ocr_store(store_path: str, engine: str = DEFAULT_ENGINE, workers: int = 2,
              on_progress: OcrProgress | None = None, wait: float = 0.0) -> OcrSummary:
    """Read every stored image this engine has not read yet (`index build --ocr`)."""
    with Store.open(store_path, readonly=False, wait=wait) as store:
        items = [(img.sha256, img.paths[0]) for img in store.iter_images() if img.paths]
        engine_id = shared_engine(engine).engine_id
        cached = sum(store.ocr(sha, engine_id) is not None for sha, _ in items)
        res = ocr_images(store, items, engine, workers, on_progress, save=True)
    return OcrSummary(len(items), cached, len(items) - cached,
                      sum(r.has_text for r in res.values()),
                      sum(r.error is not None for r in res.values()), engine_id)


# ---- the text channel ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TextChannel:
    classifier: TextClassifier
    engine: str  # engine name (make_engine), its id is in classifier.meta["engine"]

    def probability(self, result: OcrResult | None) -> float | None:
        """P(malicious) of the image's text; None when it shows no (readable) text."""
        if result is None or not result.has_text:
            return None
        return float(self.classifier.probability([result.text])[0])


def open_text_channel(store: Store) -> TextChannel | None:
    """The store's trained text classifier, None when none was trained."""
    clf = load_text_classifier(detector_dir(store))
    if clf is None:
        return None
    name = str(clf.meta.get("engine_name", DEFAULT_ENGINE))
    if shared_engine(name).engine_id != clf.meta.get("engine"):
        raise ClassifierError(f"the text classifier was trained on {clf.meta.get('engine')} "
                              "OCR; retrain with `clipdex detect train --ocr`")
    return TextChannel(clf, name)


def with_text(verdict: Verdict, channel: TextChannel, result: OcrResult | None,
              settings: DetectSettings) -> Verdict:
    """The verdict rescored with the text channel (unchanged when the image shows no text)."""
    p = channel.probability(result)
    if p is None:
        return replace(verdict, ocr_text=result.text if result else None)
    nearest = verdict.nearest_malicious
    score = combine(verdict.lr_probability, verdict.knn_vote, nearest, settings, p)
    phrases = [(ph.text, round(ph.weight, 4)) for ph in channel.classifier.phrases(result.text)
               if ph.weight > 0][:5] if result else []
    return replace(verdict, score=score, flagged=score >= settings.threshold,
                   text_probability=p, ocr_text=result.text if result else None,
                   text_phrases=phrases)


@dataclass(frozen=True)
class TextTrainReport:
    path: str
    engine: str
    counts: dict[str, int]  # with_text / without_text per label


def train_text_channel(store: Store, shas: list[str], paths: list[str], labels: list[int],
                       train_mask: np.ndarray, compute: bool, engine: str = DEFAULT_ENGINE,
                       workers: int = 2) -> tuple[TextTrainReport | None, dict[str, OcrResult]]:
    """Fit the text classifier on the OCR text of the training images (those with text).

    Uses stored OCR results; `compute` reads the labelled images that lack one (and stores
    them). Returns (None, ...) when there is no text of both labels to learn from.
    """
    items = list(zip(shas, paths, strict=True))
    if compute:
        ocr = ocr_images(store, items, engine, workers, save=True)
    else:
        engine_id = shared_engine(engine).engine_id
        ocr = {sha: OcrResult.from_dict(rec) for sha, _ in items
               if (rec := store.ocr(sha, engine_id)) is not None}
    texts, ys = [], []
    for sha, y, keep in zip(shas, labels, train_mask, strict=True):
        if keep and sha in ocr and ocr[sha].has_text:
            texts.append(ocr[sha].text)
            ys.append(int(y))
    if set(ys) != {0, 1}:
        _forget_text_classifier(store)  # a stale one would not match the new detector
        return None, ocr
    counts = {"malicious_with_text": sum(ys), "benign_with_text": len(ys) - sum(ys),
              "without_text": int(train_mask.sum()) - len(ys)}
    engine_id = shared_engine(engine).engine_id
    meta = {**TextMeta(engine_id, counts).__dict__, "engine_name": engine}
    clf = TextClassifier.fit(texts, ys, TextSettings(), meta)
    return TextTrainReport(clf.save(detector_dir(store)), engine_id, counts), ocr


def _forget_text_classifier(store: Store) -> None:
    try:
        os.unlink(os.path.join(detector_dir(store), TEXT_POINTER))
    except FileNotFoundError:
        pass


def evaluate_channels(verdicts: list[Verdict], labels: Iterable[int],
                      categories: Iterable[str | None], settings: DetectSettings) -> EvalReport:
    """LR, kNN, CLIP hybrid, text alone and the combination, side by side.

    `verdicts` already carry the text channel (`with_text`); text alone counts an image that
    shows no text as score 0 (not flagged), the combination falls back to the CLIP hybrid.
    """
    clip = [combine(v.lr_probability, v.knn_vote, v.nearest_malicious, settings)
            for v in verdicts]
    return evaluate(list(labels), list(categories), {
        "lr": ([v.lr_probability for v in verdicts], settings.lr_threshold),
        "knn": ([v.knn_vote for v in verdicts], settings.knn_threshold),
        "clip": (clip, settings.threshold),
        "text": ([v.text_probability or 0.0 for v in verdicts], settings.text_threshold),
        "hybrid": ([v.score for v in verdicts], settings.threshold)})


# ---- search by the text an image shows --------------------------------------------------------
@dataclass(frozen=True)
class TextHit:
    rank: int
    score: float  # 1.0: the query's letters appear in order (spaces ignored); else n-gram overlap
    sha256: str
    paths: list[str]
    snippet: str


def _squash(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", text.lower())


def _grams(text: str, n: int = 3) -> set[str]:
    return {text[i:i + n] for i in range(max(1, len(text) - n + 1))}


def search_ocr_text(store: Store, query: str, k: int = 20, engine: str = DEFAULT_ENGINE,
                    min_score: float = 0.6) -> list[TextHit]:
    """Stored images whose OCR text contains `query`: exact (ignoring case, spaces and
    punctuation, since OCR runs words together) first, then by share of the query's
    3-grams found (tolerates misread letters)."""
    q = _squash(query)
    if not q:
        raise ValueError("the text query has no letters or digits")
    qg = _grams(q)
    hits: list[tuple[float, str, str]] = []
    for sha, rec in store.iter_ocr(shared_engine(engine).engine_id):
        res = OcrResult.from_dict(rec)
        t = _squash(res.text)
        score = 1.0 if q in t else len(qg & _grams(t)) / len(qg)
        if score >= min_score and t:
            hits.append((score, sha, _snippet(res, query)))
    hits.sort(key=lambda h: (-h[0], h[1]))
    out = []
    for rank, (score, sha, snip) in enumerate(hits[:k], 1):
        img = store.image(sha)
        out.append(TextHit(rank, round(score, 4), sha, list(img.paths) if img else [], snip))
    return out


def _snippet(res: OcrResult, query: str) -> str:
    q = _squash(query)
    for line in res.lines:
        if q and q in _squash(line.text):
            return line.text
    return res.text.replace("\n", " / ")[:120]

