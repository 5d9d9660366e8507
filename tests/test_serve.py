"""`clipdex serve` over real HTTP: a uvicorn subprocess on a loopback port, driven by httpx."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .conftest import CLIPDEX_BIN, near_copy, scene
from .servekit import (
    HOSTILE_NAME,
    Server,
    build,
    clipdex,
    make_collection,
    make_labelled_store,
    png_bytes,
    running_server,
    tiny_env,
)

pytestmark = pytest.mark.skipif(not os.path.exists(CLIPDEX_BIN),
                                reason="clipdex is not installed in this environment")
MAX_BODY = 400_000


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str
           ) -> Iterator[tuple[Server, Path, dict[str, str]]]:
    root = tmp_path_factory.mktemp("serve")
    env = tiny_env(tiny_weights, root / "photos.clipdex", root)
    photos = make_collection(root)
    build(photos, env)
    with running_server(env, root, "--max-body", str(MAX_BODY)) as server:
        yield server, photos, env


@pytest.fixture
def api(served: tuple[Server, Path, dict[str, str]]) -> Iterator[httpx.Client]:
    with served[0].client() as client:
        yield client


def upload(api: httpx.Client, data: bytes, path: str = "/v1/search", **params: object
           ) -> httpx.Response:
    return api.post(path, params=params, files={"image": ("q.jpg", data, "image/jpeg")})


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=70)
    return buf.getvalue()


def test_search_by_uploaded_image_finds_its_original(api, served):
    photos = served[1]
    r = upload(api, jpeg(near_copy(scene(4, (240, 180)))), k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "image" and len(body["hits"]) == 5
    top = body["hits"][0]
    assert top["paths"] == [str(photos / "p4.png")]
    assert re.fullmatch(r"[0-9a-f]{64}", top["id"])
    assert top["thumbnail"] == f"/v1/images/{top['id']}/thumbnail"
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4, 5]


def test_uploading_indexed_bytes_is_a_near_duplicate_of_itself(api, served):
    data = (served[1] / "p3.png").read_bytes()
    hits = upload(api, data, k=3).json()["hits"]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4) and hits[0]["near_duplicate"]
    assert not any(h["near_duplicate"] for h in hits if h["score"] < 0.95)


def test_text_and_stored_id_queries(api):
    text = api.get("/v1/search/text", params={"q": "a red square", "k": 4})
    assert text.status_code == 200 and len(text.json()["hits"]) == 4
    first = text.json()["hits"][0]["id"]
    similar = api.get(f"/v1/images/{first}/similar", params={"k": 3}).json()
    assert len(similar["hits"]) == 3 and first not in {h["id"] for h in similar["hits"]}
    assert api.get("/v1/search/text", params={"q": "   "}).status_code == 400


@pytest.mark.parametrize("bad_id", ["0" * 64, "../../etc/passwd", "%2e%2e%2fetc%2fpasswd", "1"])
def test_unknown_or_path_like_ids_are_404(api, bad_id):
    for path in (f"/v1/images/{bad_id}/thumbnail", f"/v1/images/{bad_id}/similar"):
        r = api.get(path)
        assert r.status_code == 404, (path, r.text)


def test_thumbnail_is_a_small_jpeg_of_the_stored_image(api):
    hit = api.get("/v1/search/text", params={"q": "x", "k": 1}).json()["hits"][0]
    r = api.get(hit["thumbnail"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256


def test_auth_is_required_except_for_health_and_the_page(served):
    server = served[0]
    with server.client(None) as anon, server.client("wrong-token-0123456789") as wrong:
        for c in (anon, wrong):
            r = c.get("/v1/stats")
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert upload(c, b"x" * 100).status_code == 401
        assert anon.get("/v1/health").json() == {"status": "ok"}
        page = anon.get("/")
        assert page.status_code == 200 and "<title>clipdex</title>" in page.text
        assert "script-src 'sha256-" in page.headers["content-security-policy"]


def test_stats(api):
    s = api.get("/v1/stats").json()
    assert s["counts"]["images"] == 12 and s["index_fresh"] and s["model"]["dim"] > 0
    assert s["detector"] is False


def test_body_over_the_limit_is_413_by_header_and_when_chunked(api, served):
    big = os.urandom(MAX_BODY + 10_000)
    assert upload(api, big).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
        yield (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
               b"Content-Type: image/jpeg\r\n\r\n")
        for _ in range(20):
            yield b"a" * 50_000

    try:
        r = api.post("/v1/search", content=chunks(),
                     headers={"Content-Type": "multipart/form-data; boundary=xyz"})
        assert r.status_code == 413 and r.json()["error"] == "too_large"
    except httpx.WriteError:  # the server may close before the client finished sending
        pass
    assert api.get("/v1/health").status_code == 200


def _tiff() -> bytes:
    buf = io.BytesIO()
    scene(1).save(buf, "TIFF")
    return buf.getvalue()


def _png_bomb(side: int = 30_000) -> bytes:
    """A valid PNG header claiming side x side pixels (900 MP), with almost no data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("data, status, code", [
    (_png_bomb(), 422, "decompression_bomb"),
    (b"", 415, "unidentified"),
    (b"GIF89a" + b"\0" * 7, 422, "corrupt"),
    (os.urandom(5000), 415, "unidentified"),
    (b"hello, I am text named .jpg", 415, "unidentified"),
    (_tiff(), 415, "format_not_allowed"),
    (png_bytes(5, fmt="JPEG")[:1500], 422, "truncated"),
])
def test_bad_uploads_are_4xx_with_a_reason_and_the_server_survives(api, data, status, code):
    for path in ("/v1/search", "/v1/detect"):
        r = upload(api, data, path)
        if path == "/v1/detect" and r.status_code == 409:
            continue  # no detector in this store: checked before decoding
        assert (r.status_code, r.json()["error"]) == (status, code), r.text
        assert r.json()["detail"]
    assert upload(api, png_bytes(2)).status_code == 200


@pytest.mark.parametrize("params", [{"k": 0}, {"k": 100000}, {"k": "many"},
                                    {"threshold": 2}])
def test_bad_parameters_are_422(api, params):
    r = upload(api, png_bytes(3), **params)
    assert r.status_code == 422 and r.json()["error"] == "bad_request", r.text


def test_missing_or_non_multipart_upload_is_a_clear_4xx(api):
    r = api.post("/v1/search", content=b"raw bytes", headers={"Content-Type": "image/png"})
    assert r.status_code == 422 and "image" in r.json()["detail"]
    assert api.post("/v1/search", data={"other": "x"}).status_code == 422


def test_detect_without_a_trained_detector_is_409_never_clean(api):
    r = upload(api, png_bytes(4), "/v1/detect")
    assert r.status_code == 409 and r.json()["error"] == "no_detector"
    assert "clipdex detect train" in r.json()["detail"]


def test_hostile_file_name_is_returned_as_data(api, served):
    data = (served[1] / HOSTILE_NAME).read_bytes()
    assert upload(api, data, k=1).json()["hits"][0]["paths"] == [str(served[1] / HOSTILE_NAME)]


def test_index_is_reloaded_when_a_build_publishes_a_new_generation(api, served):
    server, photos, env = served
    before = api.get("/v1/stats").json()
    extra = photos.parent / "later"
    extra.mkdir()
    scene(500, (240, 180)).save(extra / "new.png")
    build(extra, env)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = api.get("/v1/stats").json()
        if stats["index"]["generation"] > before["index"]["generation"]:
            break
        time.sleep(0.2)
    assert stats["index"]["ntotal"] == before["index"]["ntotal"] + 1
    top = upload(api, (extra / "new.png").read_bytes(), k=1).json()["hits"][0]
    assert top["paths"] == [str(extra / "new.png")]
    assert server.proc.poll() is None


def test_non_loopback_bind_without_token_refuses_to_start(tmp_path, served):
    out = clipdex("serve", "--host", "0.0.0.0", "--port", "1", env=served[2], check=False)
    assert out.returncode == 2 and "--token-file" in out.stderr


def test_missing_store_is_a_clear_error(tmp_path, served):
    env = {**served[2], "CLIPDEX_STORE": str(tmp_path / "none")}
    out = clipdex("serve", "--port", "1", env=env, check=False)
    assert out.returncode == 1 and "no clipdex store" in out.stderr


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, tiny_weights: str
             ) -> Iterator[tuple[Server, Path, dict[str, str]]]:
    """A store whose detector was trained through the CLI on a few labelled images."""
    root = tmp_path_factory.mktemp("detect")
    env = tiny_env(tiny_weights, root / "d.clipdex", root)
    make_labelled_store(root, env)
    with running_server(env, root) as server:
        yield server, root, env


def test_detect_returns_the_same_verdict_as_the_cli(labelled):
    server, root, env = labelled
    image = root / "bad" / "3.png"
    with server.client() as api:
        r = upload(api, image.read_bytes(), "/v1/detect")
        assert r.status_code == 200, r.text
        v = r.json()
        assert api.get("/v1/stats").json()["detector"] is True
        n = v["neighbours"][0]
        assert n["label"] == 1 and n["category"] == "dark" and n["path"] == str(image)
        assert api.get(n["thumbnail"]).status_code == 200
    cli = json.loads(clipdex("detect", "run", str(image), "--json", env=env).stdout)
    assert set(v) == set(cli) - {"path", "error"}
    assert v["flagged"] == cli["flagged"] and v["score"] == pytest.approx(cli["score"], abs=1e-5)
    assert v["nearest_malicious"] == pytest.approx(1.0, abs=1e-4)
    assert [x["path"] for x in v["neighbours"]] == [x["path"] for x in cli["neighbours"]]
