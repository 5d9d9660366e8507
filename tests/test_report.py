"""`search --html` and `dedup --html`: one self-contained file, thumbnails inside, paths escaped."""

from __future__ import annotations

import base64
import html
import io
import os
import re

import pytest
from PIL import Image

from .conftest import CLIPDEX_BIN, near_copy, scene
from .servekit import HOSTILE_NAME, build, clipdex, make_collection, tiny_env

pytestmark = pytest.mark.skipif(not os.path.exists(CLIPDEX_BIN),
                                reason="clipdex is not installed in this environment")


def _thumbnails(page: str) -> list[Image.Image]:
    found = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in found]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("report")
    env = tiny_env(tiny_weights, root / "r.clipdex", root)
    photos = make_collection(root)
    build(photos, env)
    return photos, env


def test_search_and_dedup_reports(tmp_path, built):
    photos, env = built
    query = tmp_path / "q.jpg"
    near_copy(scene(4, (240, 180))).save(query, quality=70)

    out = tmp_path / "q.html"
    clipdex("search", str(query), "--text", "x", "--k", "12", "--html", str(out), env=env)
    page = out.read_text()
    thumbs = _thumbnails(page)
    assert len(thumbs) == 1 + 12 + 12  # the query image, then both queries' hits
    assert all(t.format == "JPEG" and max(t.size) <= 256 for t in thumbs)
    assert html.escape(str(photos / HOSTILE_NAME)) in page
    assert HOSTILE_NAME not in page and "<script" not in page and "<img src=x" not in page
    assert "http" not in page.replace("http-equiv", "")  # nothing is fetched from elsewhere

    sheet = tmp_path / "groups.html"
    clipdex("dedup", "--threshold", "0.9", "--html", str(sheet), env=env)
    groups = sheet.read_text()
    assert groups.count("<h2>group ") >= 1
    assert html.escape(str(photos / "p7-reupload.jpg")) in groups
    cards = groups.count('<div class="card')
    assert cards >= 2 and len(_thumbnails(groups)) == cards  # every member has its picture


def test_report_to_an_unwritable_place_is_a_clear_error(tmp_path, built):
    out = clipdex("dedup", "--html", str(tmp_path / "no" / "such" / "dir.html"), env=built[1],
                  check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
