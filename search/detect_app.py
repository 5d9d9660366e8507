"""Wiring for labels and detection: the few `*_labels`/`*_detector` calls the CLI makes."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from indexer.build import BuildSettings, Progress
from indexer.decode import DecodeLimits, decode_bytes, read_file
from indexer.embed import Embedder, ModelSpec
from indexer.errors import ClassifierError, ClipdexError, DecodeError
from indexer.scan import scan
from indexer.store import Store
from indexer.types import Failure, FloatArray, ScanEntry
from indexer.vectors import normalize_rows

from .app import load_embedder, run_build, store_embedder
from .detect import (
    Detector,
    DetectSettings,
    Reference,
    TrainMeta,
    Verdict,
    load_detector,
    save_detector,
    with_thresholds,
)
from .labels import LabelEntry, LabelReport, labelled_vectors, read_jsonl, store_labels
from .metrics import EvalReport, evaluate, split_by_identity, threshold_for_fpr
from .ocr_app import (
    TextChannel,
    TextTrainReport,
    evaluate_channels,
    ocr_images,
    open_text_channel,
    train_text_channel,
    with_text,
)


# ---- labels ------------------------------------------------------------------------------------
def import_labels(store_path: str, jsonl: str, spec: ModelSpec, settings: BuildSettings,
                  overwrite: bool = False, on_progress: Progress | None = None,
                  wait: float = 0.0, embedder: Embedder | None = None) -> LabelReport:
    """Embed the listed images that the store lacks, then store their labels."""
    return label_files(store_path, read_jsonl(jsonl), os.path.abspath(jsonl), spec, settings,
                       overwrite, on_progress, wait, embedder)


def label_files(store_path: str, entries: list[LabelEntry], source: str, spec: ModelSpec,
                settings: BuildSettings, overwrite: bool = False,
                on_progress: Progress | None = None, wait: float = 0.0,
                embedder: Embedder | None = None) -> LabelReport:
    """Embed (core build pipeline) the files the store lacks, then label them by identity."""
    todo = _not_in_store(store_path, [e.path for e in entries])
    if todo:
        emb = embedder or _embedder_for(store_path, spec)
        run_build(todo, store_path, spec, settings, on_progress=on_progress, wait=wait,
                  embedder=emb)
    with Store.open(store_path, readonly=False, wait=wait) as store:
        return store_labels(store, entries, source, overwrite)


def _not_in_store(store_path: str, paths: list[str]) -> list[str]:
    """Paths that are new or changed since the store last saw them (all of them: no store)."""
    if not os.path.exists(os.path.join(store_path, "data.mdb")):
        return list(dict.fromkeys(paths))
    with Store.open(store_path) as store:
        return [p for p in dict.fromkeys(paths) if not _unchanged(store, p)]


def _unchanged(store: Store, path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False  # let the build pipeline record why
    return store.is_unchanged(ScanEntry(path, st.st_size, st.st_mtime_ns))


def _embedder_for(store_path: str, spec: ModelSpec) -> Embedder:
    """The store's own model when it exists (same vectors), else the one asked for."""
    if os.path.exists(os.path.join(store_path, "data.mdb")):
        with Store.open(store_path) as store:
            if store.manifest() is not None:
                return store_embedder(store, spec.weights, spec.model_config, spec.device)
    return load_embedder(spec)


# ---- training ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainReport:
    path: str
    counts: dict[str, Any]
    validation: EvalReport | None
    text: TextTrainReport | None = None  # the OCR text channel, when there was text to learn


def train_detector(store_path: str, settings: DetectSettings, holdout: float = 0.2,
                   seed: int = 0, wait: float = 0.0, ocr: bool = False,
                   ocr_engine: str = "rapidocr", ocr_workers: int = 2) -> TrainReport:
    """Fit on stored, validated labelled vectors (minus a seeded holdout) and save it.

    Every channel with data is trained: the text channel when the labelled images have OCR
    results in the store (`ocr` reads those that lack one first)."""
    with Store.open(store_path, readonly=False, wait=wait) as store:
        lab = labelled_vectors(store)
        groups = [f"{y}/{c}" for y, c in zip(lab.labels, lab.categories, strict=True)]
        held = split_by_identity(lab.shas, groups, holdout, seed)
        ref = _reference(lab, ~held)
        counts = {"train": _by_group(ref.labels, ref.categories), "validation": int(held.sum()),
                  "excluded": dict(lab.excluded)}
        meta = TrainMeta(store.identity().to_dict(), counts, holdout, seed,
                         [s for s, h in zip(lab.shas, held, strict=True) if h])
        detector = Detector.fit(ref, settings, meta.as_meta())
        path = save_detector(store, detector)
        text_report, texts = train_text_channel(store, lab.shas, lab.paths, lab.labels.tolist(),
                                                ~held, ocr, ocr_engine, ocr_workers)
        channel = open_text_channel(store) if text_report else None
        val = _reference(lab, held)
        val_text = (channel, [texts.get(s) for s in val.shas]) if channel else None
        report = _evaluate(detector, val.vectors, val.labels, val.categories,
                           val_text) if len(val.shas) else None
    return TrainReport(path, counts, report, text_report)


def _reference(lab: Any, mask: np.ndarray) -> Reference:
    idx = np.flatnonzero(mask)
    return Reference(lab.vectors[idx], lab.labels[idx], tuple(lab.categories[i] for i in idx),
                     tuple(lab.paths[i] for i in idx), tuple(lab.shas[i] for i in idx))


def _by_group(labels: np.ndarray, categories: Iterable[str | None]) -> dict[str, int]:
    c = Counter(f"{'malicious' if y else 'benign'}/{cat or '-'}"
                for y, cat in zip(labels.tolist(), categories, strict=True))
    return dict(sorted(c.items()))


def _evaluate(detector: Detector, vecs: FloatArray, labels: Iterable[int],
              categories: Iterable[str | None], text: tuple[TextChannel, list[Any]] | None = None
              ) -> EvalReport:
    verdicts = detector.score_vectors(vecs)
    s = detector.settings
    if text:  # (channel, OcrResult | None per row): every channel side by side
        verdicts = [with_text(v, text[0], r, s) for v, r in zip(verdicts, text[1], strict=True)]
        return evaluate_channels(verdicts, labels, categories, s)
    return evaluate(list(labels), list(categories), {
        "lr": ([v.lr_probability for v in verdicts], s.lr_threshold),
        "knn": ([v.knn_vote for v in verdicts], s.knn_threshold),
        "hybrid": ([v.score for v in verdicts], s.threshold)})


# ---- vectors for files (stored vector when the bytes are known, else embedded now) -------------
@dataclass(frozen=True)
class FileVector:
    path: str
    sha256: str | None
    vector: FloatArray | None
    error: str | None


class _LazyEmbedder:
    def __init__(self, factory: Callable[[], Embedder]) -> None:
        self._factory = factory
        self._emb: Embedder | None = None

    def __call__(self) -> Embedder:
        if self._emb is None:
            self._emb = self._factory()
        return self._emb


def file_vectors(store: Store, paths: Iterable[str], embedder: Callable[[], Embedder],
                 limits: DecodeLimits | None = None, batch_size: int = 32
                 ) -> Iterator[FileVector]:
    """Validated unit vectors for files, in order, a batch at a time; errors never zero-filled."""
    lazy, limits = _LazyEmbedder(embedder), limits or DecodeLimits()
    chunk: list[str] = []
    for path in paths:
        chunk.append(path)
        if len(chunk) == batch_size:
            yield from _chunk_vectors(store, chunk, lazy, limits)
            chunk = []
    if chunk:
        yield from _chunk_vectors(store, chunk, lazy, limits)


def _chunk_vectors(store: Store, paths: list[str], embedder: Callable[[], Embedder],
                   limits: DecodeLimits) -> list[FileVector]:
    out: list[FileVector] = []
    pending: list[tuple[int, FloatArray]] = []
    for path in paths:
        res, pixels = _one_file(store, path, embedder, limits)
        if pixels is not None:
            pending.append((len(out), pixels))
        out.append(res)
    if pending:
        emb = embedder()
        vecs, reasons = normalize_rows(emb.embed_pixels(np.stack([p for _, p in pending])),
                                       emb.dim)
        for (i, _), vec, why in zip(pending, vecs, reasons, strict=True):
            out[i] = replace(out[i], vector=None if why else vec,
                             error=f"bad_embedding: {why}" if why else None)
    return out


def _one_file(store: Store, path: str, embedder: Callable[[], Embedder],
              limits: DecodeLimits) -> tuple[FileVector, FloatArray | None]:
    sha = None
    try:
        data = read_file(path, limits)
        sha = hashlib.sha256(data).hexdigest()
        img = store.image(sha)
        vec = store.vector(img.id) if img else None
        if vec is not None:
            return FileVector(path, sha, vec, None), None
        image, _ = decode_bytes(data, limits, min_side=2 * _input_side(store))
        return FileVector(path, sha, None, "pending"), embedder().preprocess(image)
    except DecodeError as err:
        return FileVector(path, sha, None, f"{err.reason}: {err.message}"), None
    except ClipdexError:
        raise  # model problems concern every file: stop, do not report each one
    except Exception as err:  # a preprocessing failure costs this file only
        return FileVector(path, sha, None, f"corrupt: {type(err).__name__}: {err}"), None


def _input_side(store: Store) -> int:
    """The model's input side from the manifest, so a file that fails to decode loads no model."""
    size = store.identity().preprocess.get("size", 224)
    return int(min(size) if isinstance(size, list | tuple) else size)


# ---- running -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileVerdict:
    path: str
    verdict: Verdict | None
    error: str | None


@dataclass(frozen=True)
class ModelOptions:
    """How to reload the store's model when a file is not in the store yet."""

    weights: str | None = None
    model_config: str | None = None
    device: str = "auto"
    batch_size: int = 32
    ocr_workers: int = 2  # OCR worker processes for files the store has not read (text channel)


def open_detector(store: Store, overrides: dict[str, Any] | None = None) -> Detector:
    """The store's detector, with run-time combination settings replaced (no refit)."""
    detector = load_detector(store)
    if overrides:
        detector = detector.with_settings(replace(detector.settings, **overrides))
    return detector


def detect_files(store: Store, detector: Detector, roots: Iterable[str],
                 model: ModelOptions | None = None, limits: DecodeLimits | None = None,
                 embedder: Callable[[], Embedder] | None = None,
                 text: TextChannel | None = None) -> Iterator[FileVerdict]:
    """A verdict (or an error) for every image file under `roots`, in scan order.

    Files whose bytes are stored use the stored vector; others are decoded and embedded with
    the store's model (`embedder` overrides how it is loaded), like a search query. With a
    `text` channel, each image's OCR text (stored, else read now) is scored too.
    """
    model = model or ModelOptions()
    failures: list[Failure] = []

    def paths() -> Iterator[str]:
        for item in scan(roots):
            if isinstance(item, Failure):
                failures.append(item)
            else:
                yield item.path

    def factory() -> Embedder:
        return store_embedder(store, opts.weights, opts.model_config, opts.device)

    opts = model
    vectors = file_vectors(store, paths(), embedder or factory, limits, model.batch_size)
    if text is not None:
        yield from _text_verdicts(store, detector, text, vectors, model)
    else:
        for fv in vectors:
            yield _file_verdict(detector, fv)
    yield from (FileVerdict(f.path, None, f"{f.reason}: {f.message}") for f in failures)


def _file_verdict(detector: Detector, fv: FileVector) -> FileVerdict:
    if fv.vector is None:
        return FileVerdict(fv.path, None, fv.error or "no vector")
    return FileVerdict(fv.path, detector.score_vectors(fv.vector[None])[0], None)


def _text_verdicts(store: Store, detector: Detector, text: TextChannel,
                   vectors: Iterator[FileVector], model: ModelOptions) -> Iterator[FileVerdict]:
    """Verdicts with the text channel, OCR-ing a batch of files at a time in workers."""
    while chunk := [fv for _, fv in zip(range(model.batch_size), vectors, strict=False)]:
        todo = [(fv.sha256, fv.path) for fv in chunk if fv.vector is not None and fv.sha256]
        ocr = ocr_images(store, todo, text.engine, model.ocr_workers)
        for fv in chunk:
            res = _file_verdict(detector, fv)
            if res.verdict is not None and fv.sha256:
                res = replace(res, verdict=with_text(res.verdict, text, ocr.get(fv.sha256),
                                                     detector.settings))
            yield res


# ---- evaluating --------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalResult:
    report: EvalReport | None
    failed: list[tuple[str, str]]  # (path, why): could not be embedded, not scored
    overlap: int  # test images that are in the training reference set: left out
    calibration: dict[str, Any] | None
    settings: DetectSettings


def eval_detector(store_path: str, jsonl: str, calibrate: bool = False,
                  target_fpr: float = 0.01, model: ModelOptions | None = None,
                  wait: float = 0.0, embedder: Callable[[], Embedder] | None = None
                  ) -> EvalResult:
    """Metrics of LR, kNN and hybrid on a labelled test file; optionally calibrate first."""
    entries = read_jsonl(jsonl)
    with Store.open(store_path, readonly=not calibrate, wait=wait) as store:
        detector = load_detector(store)
        calib = None
        if calibrate:
            detector, calib = calibrate_detector(store, detector, target_fpr,
                                                 open_text_channel(store))
            save_detector(store, detector)
        return _eval_entries(store, detector, entries, model or ModelOptions(), calib, embedder,
                             open_text_channel(store))


def _eval_entries(store: Store, detector: Detector, entries: list[LabelEntry],
                  model: ModelOptions, calib: dict[str, Any] | None,
                  embedder: Callable[[], Embedder] | None,
                  text: TextChannel | None = None) -> EvalResult:
    def factory() -> Embedder:
        return embedder() if embedder else store_embedder(store, model.weights,
                                                          model.model_config, model.device)

    known = set(detector.reference.shas)
    kept: list[tuple[LabelEntry, FloatArray]] = []
    shas: list[str] = []
    failed, overlap = [], 0
    vecs = file_vectors(store, [e.path for e in entries], factory, batch_size=model.batch_size)
    for entry, fv in zip(entries, vecs, strict=True):
        if fv.vector is None:
            failed.append((entry.path, fv.error or "no vector"))
        elif fv.sha256 in known:
            overlap += 1
        else:
            kept.append((entry, fv.vector))
            shas.append(fv.sha256 or "")
    texts = None
    if text is not None and kept:
        ocr = ocr_images(store, [(s, e.path) for s, (e, _) in zip(shas, kept, strict=True)],
                         text.engine, model.ocr_workers, save=not store.readonly)
        texts = (text, [ocr.get(s) for s in shas])
    report = _evaluate(detector, np.stack([v for _, v in kept]), [e.label for e, _ in kept],
                       [e.category for e, _ in kept], texts) if kept else None
    return EvalResult(report, failed, overlap, calib, detector.settings)


def calibrate_detector(store: Store, detector: Detector, target_fpr: float,
                       text: TextChannel | None = None) -> tuple[Detector, dict[str, Any]]:
    """Thresholds giving at most `target_fpr` on the benign images of the training holdout."""
    shas = list(detector.meta.get("validation") or [])
    vecs, labels, kept = _validation_set(store, shas)
    benign = labels == 0
    if not benign.any():
        raise ClassifierError("no benign images in the validation split: retrain with "
                              "`clipdex detect train --holdout 0.2` (or more benign labels)")
    detector = _calibrate_near_copy(detector, vecs[benign], target_fpr)
    verdicts = detector.score_vectors(vecs[benign])
    extra: dict[str, float] = {}
    if text is not None:  # the hybrid score then includes the text channel (see combine)
        benign_shas = [s for s, b in zip(kept, benign, strict=True) if b]
        ocr = _stored_text(store, text, benign_shas)
        verdicts = [with_text(v, text, ocr.get(s), detector.settings)
                    for v, s in zip(verdicts, benign_shas, strict=True)]
        extra["text_threshold"] = threshold_for_fpr(
            [v.text_probability or 0.0 for v in verdicts], target_fpr)
    thresholds = {**extra,
        "lr_threshold": threshold_for_fpr([v.lr_probability for v in verdicts], target_fpr),
        "knn_threshold": threshold_for_fpr([v.knn_vote for v in verdicts], target_fpr),
        "threshold": threshold_for_fpr([v.score for v in verdicts], target_fpr)}
    thresholds = {k: min(v, 1.0 + 1e-7) for k, v in thresholds.items()}
    calib = {"target_fpr": target_fpr, "benign_validation": int(benign.sum()),
             "near_copy": detector.settings.near_copy, **thresholds}
    tuned = with_thresholds(detector, thresholds)
    tuned.meta["calibration"] = calib
    return tuned, calib


def _calibrate_near_copy(detector: Detector, benign: FloatArray, target_fpr: float) -> Detector:
    """Raise `near_copy` above the similarity benign images already have to known attacks.

    A "near-copy" must be closer to an attack than benign images get; otherwise the rule alone
    would exceed the false-positive budget (e.g. with weaker weights, where all images are
    similar).
    """
    s = detector.settings
    near = [v.nearest_malicious for v in detector.score_vectors(benign)
            if v.nearest_malicious is not None]
    if s.near_copy is None or not near:
        return detector
    floor = min(1.0, threshold_for_fpr(near, target_fpr))
    return detector.with_settings(replace(s, near_copy=max(s.near_copy, floor)))


def _stored_text(store: Store, text: TextChannel, shas: list[str]) -> dict[str, Any]:
    items = [(s, img.paths[0]) for s in shas if (img := store.image(s)) and img.paths]
    return ocr_images(store, items, text.engine, save=not store.readonly)


def _validation_set(store: Store, shas: list[str]) -> tuple[FloatArray, np.ndarray, list[str]]:
    vecs, labels, kept = [], [], []
    for sha in shas:
        rec, img = store.label(sha), store.image(sha)
        vec = store.vector(img.id) if img else None
        if rec is not None and vec is not None:
            vecs.append(vec)
            labels.append(int(rec["label"]))
            kept.append(sha)
    if not vecs:
        raise ClassifierError("the detector has no validation split in this store: retrain "
                              "with `clipdex detect train --holdout 0.2`")
    return np.stack(vecs).astype(np.float32), np.asarray(labels, np.int8), kept

