"""Labels in the store, training on stored vectors, detection and evaluation on files.

Uses the deterministic fake embedder: "malicious" images are reddish scenes, "benign" ones
bluish, so the right answers are known.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.build import BuildSettings
from indexer.embed import FakeEmbedder, ModelSpec
from indexer.store import Store
from search.app import run_build
from search.detect import DetectSettings, load_detector
from search.detect_app import (
    detect_files,
    eval_detector,
    import_labels,
    label_files,
    train_detector,
)
from search.labels import LabelEntry, labelled_vectors, read_jsonl

SPEC = ModelSpec(name="fake", pretrained=None, random_init=True)
SETTINGS = BuildSettings(workers=1, batch_size=8)


def tinted(seed: int, malicious: bool, size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array([200, 40, 40] if malicious else [40, 60, 200], np.float32)
    pix = np.clip(base + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pix, "RGB")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """data/ with 20 malicious + 20 benign PNGs, a corrupt one, and labels.jsonl (relative)."""
    root = tmp_path / "data"
    for sub in ("bad", "good"):
        (root / sub).mkdir(parents=True)
    rows = []
    for i in range(40):
        mal = i % 2 == 0
        rel = f"{'bad' if mal else 'good'}/{i}.png"
        tinted(i, mal).save(root / rel)
        rows.append({"path": rel, "label": int(mal), "category": "popup" if mal else "photo"})
    (root / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    rows.append({"path": "good/broken.png", "label": 0, "category": "photo"})
    (root / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def emb() -> FakeEmbedder:
    return FakeEmbedder(dim=16)


def _import(store_path: str, jsonl: Path, emb: FakeEmbedder, overwrite: bool = False):
    return import_labels(store_path, str(jsonl), SPEC, SETTINGS, overwrite, embedder=emb)


def test_import_embeds_new_images_and_labels_them_by_bytes(dataset, store_path, emb):
    report = _import(store_path, dataset / "labels.jsonl", emb)
    assert report.asked == 41 and report.written == 41 and not report.conflicts
    assert report.not_embedded == 1  # broken.png: labelled by its bytes, but no vector
    with Store.open(store_path) as st:
        assert st.counts()["images"] == 40 and st.counts()["labels"] == 41
        sha = st.sha_for_path(str(dataset / "bad" / "0.png"))
        assert st.label(sha)["label"] == 1 and st.label(sha)["category"] == "popup"
        lab = labelled_vectors(st)
    assert len(lab.shas) == 40 and lab.excluded["not_embedded"] == 1
    assert np.allclose(np.linalg.norm(lab.vectors, axis=1), 1.0)  # no zero vector sneaks in
    again = _import(store_path, dataset / "labels.jsonl", emb)
    assert again.written == 0 and again.unchanged == 41


def test_jsonl_paths_are_relative_to_the_file(dataset):
    entries = read_jsonl(str(dataset / "labels.jsonl"))
    assert entries[0] == LabelEntry(str(dataset / "bad" / "0.png"), 1, "popup")


def test_conflicting_labels_are_reported_not_overwritten(dataset, store_path, emb):
    _import(store_path, dataset / "labels.jsonl", emb)
    flipped = dataset / "flipped.jsonl"
    copy = dataset / "copy-of-0.png"
    copy.write_bytes((dataset / "bad" / "0.png").read_bytes())  # same bytes, another name
    flipped.write_text(json.dumps({"path": "copy-of-0.png", "label": 0}) + "\n"
                       + json.dumps({"path": "good/1.png", "label": "benign",
                                     "category": "photo"}) + "\n")
    report = _import(store_path, flipped, emb)
    assert len(report.conflicts) == 1 and report.unchanged == 1 and report.written == 0
    c = report.conflicts[0]
    assert c.stored["label"] == 1 and c.asked["label"] == 0 and c.path == str(copy)
    with Store.open(store_path) as st:
        assert st.label(c.sha256)["label"] == 1  # kept
    forced = _import(store_path, flipped, emb, overwrite=True)
    assert forced.written == 1
    with Store.open(store_path) as st:
        assert st.label(c.sha256)["label"] == 0


def test_conflict_inside_one_import_is_reported_and_the_first_label_wins(dataset, store_path, emb):
    jsonl = dataset / "twice.jsonl"
    jsonl.write_text(json.dumps({"path": "bad/0.png", "label": 1}) + "\n"
                     + json.dumps({"path": "bad/0.png", "label": 0}) + "\n")
    report = _import(store_path, jsonl, emb)
    assert len(report.conflicts) == 1 and report.written == 1


def _trained(dataset: Path, store_path: str, emb: FakeEmbedder, **kw):
    _import(store_path, dataset / "labels.jsonl", emb)
    return train_detector(store_path, DetectSettings(**kw), holdout=0.25, seed=0)


def test_train_uses_valid_vectors_only_and_counts_the_rest(dataset, store_path, emb):
    result = _trained(dataset, store_path, emb)
    assert result.counts["excluded"] == {"not_embedded": 1}
    assert result.counts["validation"] == 10
    assert sum(result.counts["train"].values()) == 30
    assert result.validation is not None and result.validation.methods["lr"].roc_auc == 1.0
    with Store.open(store_path) as st:
        det = load_detector(st)
        held = set(det.meta["validation"])
    assert not held & set(det.reference.shas)  # never validate on training images


def test_detect_files_scores_known_and_new_images_and_reports_failures(dataset, store_path,
                                                                       emb, tmp_path):
    _trained(dataset, store_path, emb, threshold=0.5)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    tinted(1000, True).save(incoming / "new-attack.png")
    tinted(1001, False).save(incoming / "new-photo.png")
    (incoming / "known.png").write_bytes((dataset / "bad" / "2.png").read_bytes())
    (incoming / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(50))
    calls = []

    def factory() -> FakeEmbedder:
        calls.append(1)
        return emb

    with Store.open(store_path) as st:
        det = load_detector(st)
        out = {os.path.basename(f.path): f for f in detect_files(st, det, [str(incoming)],
                                                                 embedder=factory)}
    assert out["new-attack.png"].verdict.flagged
    assert not out["new-photo.png"].verdict.flagged
    known = out["known.png"].verdict
    assert known.flagged and known.score == 1.0 and known.nearest_malicious == pytest.approx(1)
    assert out["zz-broken.jpg"].verdict is None and out["zz-broken.jpg"].error
    assert len(calls) == 1  # the model was needed for the new files only, loaded once


def test_detect_files_reuses_stored_vectors_without_the_model(dataset, store_path, emb):
    _trained(dataset, store_path, emb)

    def no_model() -> FakeEmbedder:
        raise AssertionError("the model was loaded for bytes that are stored")

    with Store.open(store_path) as st:
        res = list(detect_files(st, load_detector(st), [str(dataset / "bad")], embedder=no_model))
    assert len(res) == 20 and all(r.verdict is not None for r in res)


def test_eval_calibrates_for_the_target_fpr_and_stores_it(dataset, store_path, emb, tmp_path):
    _trained(dataset, store_path, emb)
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    rows = []
    for i in range(500, 520):
        mal = i % 2 == 0
        tinted(i, mal).save(test_dir / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": int(mal), "category": "popup" if mal
                     else "photo"})
    rows.append({"path": str(dataset / "bad" / "0.png"), "label": 1})  # a training image
    (test_dir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = eval_detector(store_path, str(test_dir / "test.jsonl"), calibrate=True,
                        target_fpr=0.0, embedder=lambda: emb)
    assert res.calibration is not None and res.calibration["target_fpr"] == 0.0
    assert res.report is not None and res.report.n == 20 and res.overlap <= 1
    assert set(res.report.methods) == {"lr", "knn", "hybrid"}
    assert {c.category for c in res.report.categories} == {"popup", "photo"}
    with Store.open(store_path) as st:
        det = load_detector(st)
        benign = [st.vector(st.image(sha).id) for sha in det.meta["validation"]
                  if st.label(sha)["label"] == 0]
    assert det.settings.threshold == res.settings.threshold
    assert det.meta["calibration"]["threshold"] == res.settings.threshold
    assert det.settings.near_copy is not None and det.settings.near_copy >= 0.95
    s = det.settings
    for v in det.score_vectors(np.stack(benign)):  # target FPR 0 on the validation benign
        assert v.lr_probability < s.lr_threshold and v.knn_vote < s.knn_threshold
        assert not v.flagged


def test_labels_add_on_folder_uses_existing_store_vectors(dataset, store_path, emb):
    run_build([str(dataset)], store_path, SPEC, SETTINGS, embedder=emb)
    from search.labels import entries_for_roots

    entries, skipped = entries_for_roots([str(dataset / "bad")], 1, "popup")
    report = label_files(store_path, entries, "labels add", SPEC, SETTINGS)  # no model needed
    assert report.written == 20 and not skipped
