"""The installed `clipdex` command, run as a user runs it, on generated images."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import CLIPDEX_BIN, TINY_CONFIG, near_copy, scene

pytestmark = pytest.mark.skipif(not os.path.exists(CLIPDEX_BIN),
                                reason="clipdex is not installed in this environment")


def run(*args, env=None, check=True):
    out = subprocess.run([CLIPDEX_BIN, *args], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **(env or {})})
    if check and out.returncode != 0:
        raise AssertionError(f"clipdex {' '.join(args)} -> {out.returncode}\n{out.stderr}")
    return out


@pytest.fixture
def collection(tmp_path: Path):
    photos = tmp_path / "photos"
    (photos / "2024").mkdir(parents=True)
    for i in range(10):
        scene(i, (240, 180)).save(photos / ("2024" if i % 2 else "") / f"p{i}.png")
    near_copy(scene(7, (240, 180))).save(photos / "p7-reupload.jpg", quality=75)
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    (photos / "notes.txt").write_text("not an image")
    query = tmp_path / "query.jpg"
    near_copy(scene(4, (240, 180))).resize((200, 150)).save(query, quality=60)
    return photos, query


def test_build_search_dedup_failures_verify(collection, tmp_path, tiny_weights):
    photos, query = collection
    env = {"CLIPDEX_WEIGHTS": tiny_weights, "CLIPDEX_MODEL_CONFIG": TINY_CONFIG,
           "CLIPDEX_STORE": str(tmp_path / "photos.clipdex")}
    built = run("index", "build", str(photos), "--model", "clipdex-tiny", "--pretrained", "",
                "--json", env=env)
    summary = json.loads(built.stdout)
    assert summary["embedded"] == 11 and sum(summary["failed"].values()) == 1

    hits = run("search", str(query), "--k", "5", "--json", env=env)
    result = json.loads(hits.stdout)
    assert result["error"] is None
    assert result["hits"][0]["paths"][0] == str(photos / "p4.png")

    human = run("search", str(query), "--k", "3", env=env).stdout.splitlines()
    assert human[1].split()[:1] == ["1"] and human[1].endswith("p4.png")

    failures = run("index", "failures", "--csv", env=env).stdout.splitlines()
    assert len(failures) == 2 and failures[1].startswith(str(photos / "corrupt.jpg"))

    info = json.loads(run("index", "info", "--json", env=env).stdout)
    assert info["manifest"]["model"]["weights_path"] == tiny_weights
    assert not info["manifest"]["model"]["random_init"] and info["index_fresh"]

    assert "OK" in run("index", "verify", env=env).stdout

    groups = [json.loads(line) for line in
              run("dedup", "--threshold", "0.9", "--json", env=env).stdout.splitlines()]
    pair = {p for g in groups for m in g["members"] for p in m["paths"] if "p7" in p}
    assert pair == {str(photos / "2024" / "p7.png"), str(photos / "p7-reupload.jpg")}

    again = json.loads(run("index", "build", str(photos), "--model", "clipdex-tiny",
                           "--pretrained", "", "--json", env=env).stdout)
    assert again["embedded"] == 0 and again["unchanged"] == 12


def test_one_bad_query_fails_the_exit_code_but_others_are_answered(collection, tmp_path,
                                                                     tiny_weights):
    photos, query = collection
    env = {"CLIPDEX_WEIGHTS": tiny_weights, "CLIPDEX_MODEL_CONFIG": TINY_CONFIG,
           "CLIPDEX_STORE": str(tmp_path / "s.clipdex")}
    run("index", "build", str(photos), "--model", "clipdex-tiny", "--pretrained", "", env=env)
    out = run("search", str(photos / "corrupt.jpg"), str(query), "--json", env=env, check=False)
    assert out.returncode == 1
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert lines[0]["error"] and lines[1]["hits"][0]["paths"][0] == str(photos / "p4.png")


def test_offline_build_without_weights_fails_with_instructions(collection, tmp_path):
    photos, _ = collection
    out = run("index", "build", str(photos), "--store", str(tmp_path / "x.clipdex"),
              check=False)
    assert out.returncode == 1
    assert "CLIPDEX_WEIGHTS" in out.stderr and "Traceback" not in out.stderr


def test_search_on_missing_store_is_a_clear_error(tmp_path):
    out = run("search", "--text", "cat", "--store", str(tmp_path / "none"), check=False)
    assert out.returncode == 1 and "no clipdex store" in out.stderr


def test_missing_root_is_a_usage_error_and_creates_no_store(tmp_path):
    out = run("index", "build", str(tmp_path / "typo"), "--store", str(tmp_path / "s.clipdex"),
              "--random-weights", check=False)
    assert out.returncode == 2 and "no such file or folder" in out.stderr
    assert not (tmp_path / "s.clipdex").exists()
