"""`clipdex labels` and `clipdex detect` through CliRunner, with the tiny open_clip model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import EXIT_FLAGGED, app

from .conftest import TINY_CONFIG, scene
from .test_detect_labels import tinted

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, tiny_weights: str) -> dict[str, str]:
    return {"CLIPDEX_WEIGHTS": tiny_weights, "CLIPDEX_MODEL_CONFIG": TINY_CONFIG,
            "CLIPDEX_STORE": str(tmp_path / "detect.clipdex")}


def cli(env: dict[str, str], *args: str, code: int = 0):
    res = runner.invoke(app, list(args), env=env)
    assert res.exit_code == code, f"clipdex {' '.join(args)} -> {res.exit_code}\n{res.output}"
    return res


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    (root / "attacks").mkdir(parents=True)
    rows = []
    for i in range(8):
        tinted(i, malicious=False, size=(96, 72)).save(root / f"photo{i}.png")
        rows.append({"path": f"photo{i}.png", "label": 0, "category": "photo"})
        scene(100 + i).save(root / "attacks" / f"a{i}.png")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_labels_train_run_eval(env, labelled, tmp_path):
    tiny = ["--model", "clipdex-tiny", "--pretrained", ""]
    out = cli(env, "labels", "import", str(labelled / "train.jsonl"), *tiny, "-q")
    assert "8 labels stored" in out.output
    out = cli(env, "labels", "add", "--label", "malicious", "--category", "popup",
              str(labelled / "attacks"), *tiny, "-q")
    assert "8 labels stored" in out.output
    counts = json.loads(cli(env, "labels", "list", "--json").output)
    assert counts == {"benign/photo": 8, "malicious/popup": 8}

    trained = json.loads(cli(env, "detect", "train", "--holdout", "0.25", "--json").output)
    assert trained["counts"]["validation"] == 4 and trained["counts"]["excluded"] == {}
    assert Path(trained["path"]).parent.name == "detector"

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "known-attack.png").write_bytes((labelled / "attacks" / "a0.png").read_bytes())
    (incoming / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    run = cli(env, "detect", "run", str(incoming), "--json", "--fail-on-flag",
              code=EXIT_FLAGGED)
    lines = {Path(d["path"]).name: d for d in map(json.loads, run.output.splitlines())}
    known = lines["known-attack.png"]
    # a training attack is in the reference set unless it was held out; its exact bytes are
    # then at similarity 1 from a known-malicious image either way when it was trained on
    assert known["error"] is None and known["flagged"] is True and known["score"] == 1.0
    assert {"lr_probability", "knn_vote", "nearest_malicious", "neighbours"} <= set(known)
    assert lines["broken.jpg"]["error"] and "score" not in lines["broken.jpg"]

    human = cli(env, "detect", "run", str(incoming / "broken.jpg"), code=1)
    assert "ERROR" in human.output

    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"path": str(incoming / "known-attack.png"), "label": 1}) + "\n")
    ev = json.loads(cli(env, "detect", "eval", str(test), "--calibrate", "--json").output)
    assert ev["calibration"]["target_fpr"] == 0.01 and ev["settings"]["threshold"] > 0


def test_detect_without_a_trained_detector_is_an_error_not_clean(env, tmp_path):
    photos = tmp_path / "p"
    photos.mkdir()
    scene(1).save(photos / "x.png")
    cli(env, "index", "build", str(photos), "--model", "clipdex-tiny", "--pretrained", "", "-q")
    res = cli(env, "detect", "run", str(photos), "--json", code=1)
    assert "no trained detector" in res.output and "flagged" not in res.output


def test_bad_label_value_is_a_usage_error(env, tmp_path):
    res = runner.invoke(app, ["labels", "add", "--label", "maybe", str(tmp_path)], env=env)
    assert res.exit_code == 2
