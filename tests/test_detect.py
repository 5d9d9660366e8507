"""The detector on generated vectors where the right answer is known: pure numpy + sklearn."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from indexer.embed import FakeEmbedder
from indexer.errors import ClassifierError, QueryError
from indexer.store import Store
from search.detect import (
    Detector,
    DetectSettings,
    Reference,
    combine,
    detector_dir,
    knn_vote,
    load_detector,
    save_detector,
    verdict_to_dict,
)
from search.metrics import binary_scores, split_by_identity, threshold_for_fpr

DIM = 16


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clusters(n: int, seed: int, spread: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Two well separated clusters on the unit sphere: label 0 around e0, label 1 around e1."""
    rng = np.random.default_rng(seed)
    centres = np.eye(DIM, dtype=np.float32)[:2]
    y = np.arange(n) % 2
    return unit(centres[y] + spread * rng.standard_normal((n, DIM))), y.astype(np.int8)


def reference(vecs: np.ndarray, y: np.ndarray) -> Reference:
    n = len(vecs)
    cats = tuple("attack" if v else "photo" for v in y)
    return Reference(vecs, y, cats, tuple(f"/ref/{i}.png" for i in range(n)),
                     tuple(f"{i:064x}" for i in range(n)))


@pytest.fixture
def fitted() -> Detector:
    vecs, y = clusters(200, seed=0)
    return Detector.fit(reference(vecs, y), DetectSettings(), {"model": {}})


@pytest.fixture
def fake_store(store_path: str):
    emb = FakeEmbedder(dim=DIM)
    with Store.create_or_open(store_path, emb.identity) as st:
        yield st


def test_settings_are_validated():
    for bad in ({"k": 0}, {"lr_weight": 1.5}, {"threshold": -0.1}, {"near_copy": 2.0},
                {"c": 0.0}, {"k": True}):
        with pytest.raises(ValueError):
            DetectSettings(**bad)


def test_separable_clusters_are_classified_by_all_three_parts(fitted: Detector):
    test, y = clusters(100, seed=1)
    verdicts = fitted.score_vectors(test)
    lr = np.array([v.lr_probability for v in verdicts])
    vote = np.array([v.knn_vote for v in verdicts])
    flagged = np.array([v.flagged for v in verdicts])
    assert ((lr >= 0.5) == (y == 1)).all()
    assert ((vote >= 0.5) == (y == 1)).all()
    assert (flagged == (y == 1)).all()
    assert all(len(v.neighbours) == 10 and v.threshold == 0.93 for v in verdicts)


def test_lr_probability_equals_sklearn_predict_proba():
    from sklearn.linear_model import LogisticRegression

    vecs, y = clusters(200, seed=0)
    det = Detector.fit(reference(vecs, y), DetectSettings(), {})
    lr = LogisticRegression(class_weight="balanced", max_iter=2000).fit(vecs, y)
    test, _ = clusters(50, seed=3)
    np.testing.assert_allclose(det.lr_probability(test), lr.predict_proba(test)[:, 1],
                               rtol=1e-6, atol=1e-9)


def test_near_copy_of_known_attack_is_flagged_when_the_classifier_is_unsure():
    vecs, y = clusters(200, seed=0)
    rng = np.random.default_rng(5)
    odd = unit(np.eye(DIM, dtype=np.float32)[0] + 0.9 * np.eye(DIM, dtype=np.float32)[5])
    det = Detector.fit(reference(np.vstack([vecs, odd]), np.append(y, 1).astype(np.int8)),
                       DetectSettings(), {})
    copy = unit(odd + 0.02 * rng.standard_normal(DIM).astype(np.float32))
    v = det.score_vectors(copy[None])[0]
    assert v.lr_probability < 0.5 and v.knn_vote < 0.5  # both parts say "benign"
    assert v.nearest_malicious is not None and v.nearest_malicious >= 0.95
    assert v.flagged and v.score == 1.0
    assert v.neighbours[0].path == "/ref/200.png" and v.neighbours[0].label == 1
    without = det.with_settings(DetectSettings(near_copy=None)).score_vectors(copy[None])[0]
    assert not without.flagged


def test_combination_rule():
    s = DetectSettings(lr_weight=0.25, near_copy=0.9)
    assert combine(0.8, 0.4, 0.5, s) == pytest.approx(0.25 * 0.8 + 0.75 * 0.4)
    assert combine(0.0, 0.0, 0.9, s) == 1.0
    assert combine(0.2, 0.2, None, s) == pytest.approx(0.2)
    assert knn_vote(np.array([0.9, 0.3], np.float32), np.array([1, 0], np.int8)) == \
        pytest.approx(0.75)
    assert knn_vote(np.array([-0.2, -0.4], np.float32), np.array([1, 0], np.int8)) == 0.5


def test_score_vectors_refuses_non_unit_and_wrong_dimension(fitted: Detector):
    with pytest.raises(ClassifierError):
        fitted.score_vectors(np.ones((1, DIM + 1), np.float32) / np.sqrt(DIM + 1))
    with pytest.raises(QueryError):
        fitted.score_vectors(np.zeros((1, DIM), np.float32))  # a failed image's zero vector
    with pytest.raises(QueryError):
        fitted.score_vectors(np.full((1, DIM), np.nan, np.float32))


def test_fit_needs_both_labels():
    vecs, _ = clusters(20, seed=0)
    with pytest.raises(ClassifierError):
        Detector.fit(reference(vecs, np.zeros(20, np.int8)), DetectSettings(), {})


def _store_meta(store: Store) -> dict:
    return {"model": store.identity().to_dict()}


def test_save_load_round_trip_without_pickle(fake_store: Store):
    vecs, y = clusters(200, seed=0)
    det = Detector.fit(reference(vecs, y), DetectSettings(k=7), _store_meta(fake_store))
    pointer = save_detector(fake_store, det)
    meta = json.loads(Path(pointer).read_text())
    assert meta["dim"] == DIM and meta["classes"] == [0, 1]
    assert meta["settings"]["k"] == 7 and meta["model"]["weights_sha256"] == "fake-seed-0"
    with np.load(os.path.join(detector_dir(fake_store), meta["arrays"]),
                 allow_pickle=False) as npz:
        assert npz["coef"].shape == (DIM,)
    loaded = load_detector(fake_store)
    test, _ = clusters(30, seed=9)
    assert [verdict_to_dict(v) for v in loaded.score_vectors(test)] == \
        [verdict_to_dict(v) for v in det.score_vectors(test)]


def test_verdict_dict_is_json(fitted: Detector):
    d = verdict_to_dict(fitted.score_vectors(clusters(1, seed=2)[0])[0])
    assert set(d) == {"score", "flagged", "lr_probability", "knn_vote", "nearest_malicious",
                      "neighbours", "threshold"}
    assert set(d["neighbours"][0]) == {"path", "label", "category", "similarity"}
    json.dumps(d)


class _Boom:
    """Unpickling this would create a marker file: the proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_offered_as_classifier_is_refused_before_any_code_runs(fake_store: Store,
                                                                      tmp_path: Path):
    vecs, y = clusters(100, seed=0)
    save_detector(fake_store, Detector.fit(reference(vecs, y), DetectSettings(),
                                           _store_meta(fake_store)))
    folder = detector_dir(fake_store)
    meta = json.loads(Path(folder, "detector.json").read_text())
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Boom(str(marker)))
    Path(folder, meta["arrays"]).write_bytes(payload)  # a pickle where the arrays should be
    with pytest.raises(ClassifierError, match="pickle"):
        load_detector(fake_store)
    Path(folder, "detector.json").write_bytes(payload)  # and as the metadata
    with pytest.raises(ClassifierError, match="pickle"):
        load_detector(fake_store)
    assert not marker.exists()


def test_npz_with_object_array_is_refused(fake_store: Store, tmp_path: Path):
    import hashlib
    import io

    vecs, y = clusters(100, seed=0)
    save_detector(fake_store, Detector.fit(reference(vecs, y), DetectSettings(),
                                           _store_meta(fake_store)))
    folder = detector_dir(fake_store)
    meta = json.loads(Path(folder, "detector.json").read_text())
    buf = io.BytesIO()
    marker = tmp_path / "pwned"
    np.savez(buf, coef=np.array([_Boom(str(marker))], dtype=object), intercept=np.zeros(1),
             classes=np.array([0, 1]), ref_vectors=vecs, ref_labels=y)
    Path(folder, meta["arrays"]).write_bytes(buf.getvalue())
    meta["arrays_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    Path(folder, "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ClassifierError):
        load_detector(fake_store)
    assert not marker.exists()


def test_missing_detector_is_an_error_never_clean(fake_store: Store):
    with pytest.raises(ClassifierError, match="detect train"):
        load_detector(fake_store)


def test_dimension_or_model_mismatch_is_refused(tmp_path: Path):
    vecs, y = clusters(100, seed=0)
    with Store.create_or_open(str(tmp_path / "a.clipdex"), FakeEmbedder(DIM).identity) as a:
        det = Detector.fit(reference(vecs, y), DetectSettings(), _store_meta(a))
        save_detector(a, det)
    wide = FakeEmbedder(dim=32).identity
    with Store.create_or_open(str(tmp_path / "b.clipdex"), wide) as b:
        with pytest.raises(ClassifierError, match="dimension"):
            load_detector(b, detector_dir(a))
    other = FakeEmbedder(dim=DIM, seed=1).identity
    with Store.create_or_open(str(tmp_path / "c.clipdex"), other) as c:
        with pytest.raises(ClassifierError, match="weights_sha256"):
            load_detector(c, detector_dir(a))


def test_threshold_for_fpr_meets_the_target():
    rng = np.random.default_rng(0)
    benign = rng.random(1000)
    for target in (0.0, 0.01, 0.05, 0.2):
        t = threshold_for_fpr(benign, target)
        assert np.mean(benign >= t) <= target
        assert np.mean(benign >= np.nextafter(t, -np.inf)) > target or t <= benign.min()
    ties = np.array([0.5] * 10 + [0.1] * 90)
    assert np.mean(ties >= threshold_for_fpr(ties, 0.05)) == 0.0


def test_split_by_identity_is_seeded_disjoint_and_per_group():
    keys = [f"k{i % 90}" for i in range(100)]  # ten keys appear twice (same bytes, two paths)
    groups = ["a" if i % 3 else "b" for i in range(90)] + ["a"] * 10
    held = split_by_identity(keys, groups, 0.25, seed=0)
    assert (held == split_by_identity(keys, groups, 0.25, seed=0)).all()
    assert not {k for k, h in zip(keys, held, strict=True) if h} & \
        {k for k, h in zip(keys, held, strict=True) if not h}
    assert 0.15 < held.mean() < 0.35


def test_binary_scores():
    s = binary_scores([1, 1, 0, 0], [0.9, 0.2, 0.8, 0.1], 0.5)
    assert (s.tp, s.fp, s.tn, s.fn) == (1, 1, 1, 1)
    assert s.precision == s.recall == s.f1 == s.fpr == 0.5 and s.roc_auc == 0.75


def test_calibration_raises_near_copy_above_benign_similarity_to_attacks():
    from search.detect_app import _calibrate_near_copy

    vecs, y = clusters(200, seed=0)
    det = Detector.fit(reference(vecs, y), DetectSettings(near_copy=0.5), {})
    benign = clusters(40, seed=4)[0][::2]  # label-0 points: similarity to attacks ~0.0-0.2
    malicious_like = clusters(40, seed=5)[0][1::2]  # would all count as near-copies at 0.5
    tuned = _calibrate_near_copy(det, malicious_like, target_fpr=0.0)
    assert tuned.settings.near_copy is not None and tuned.settings.near_copy > 0.5
    assert not any(v.score == 1.0 for v in tuned.score_vectors(malicious_like))
    assert _calibrate_near_copy(det, benign, 0.0).settings.near_copy == 0.5  # never lowered
