"""Helpers for the `clipdex serve` tests: a collection, a built store, a real uvicorn process."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from .conftest import CLIPDEX_BIN, TINY_CONFIG, near_copy, scene

TOKEN = "test-token-0123456789abcdef"
HOSTILE_NAME = '<img src=x onerror="alert(1)">&.png'


def tiny_env(tiny_weights: str, store: Path, home: Path) -> dict[str, str]:
    return {**os.environ, "CLIPDEX_WEIGHTS": tiny_weights, "CLIPDEX_MODEL_CONFIG": TINY_CONFIG,
            "CLIPDEX_STORE": str(store), "HF_HOME": str(home / "hf-home"),
            "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}


def clipdex(*args: str, env: dict[str, str], check: bool = True
            ) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([CLIPDEX_BIN, *args], capture_output=True, text=True, timeout=600,
                         env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"clipdex {' '.join(args)} -> {out.returncode}\n{out.stderr}")
    return out


def make_collection(root: Path, n: int = 10) -> Path:
    """n distinct scenes, a re-upload of scene 7, and a file with a hostile name."""
    photos = root / "photos"
    photos.mkdir(parents=True)
    for i in range(n):
        scene(i, (240, 180)).save(photos / f"p{i}.png")
    near_copy(scene(7, (240, 180))).save(photos / "p7-reupload.jpg", quality=75)
    scene(99, (240, 180)).save(photos / HOSTILE_NAME, format="PNG")
    return photos


def build(photos: Path, env: dict[str, str]) -> None:
    clipdex("index", "build", str(photos), "--model", "clipdex-tiny", "--pretrained", "",
            "--workers", "1", "--quiet", env=env)


def make_labelled_store(root: Path, env: dict[str, str]) -> None:
    """Dark scenes labelled malicious, plain ones benign, a detector trained by the CLI."""
    bad, good = root / "bad", root / "good"
    for folder, seeds in ((bad, range(0, 12)), (good, range(100, 112))):
        folder.mkdir()
        for s in seeds:
            img = scene(s, (200, 150))
            (img.point(lambda v: v // 4) if folder is bad else img).save(folder / f"{s}.png")
    build(root, env)
    opts = ["--model", "clipdex-tiny", "--pretrained", "", "-q"]
    clipdex("labels", "add", str(bad), "--label", "malicious", "--category", "dark", *opts,
            env=env)
    clipdex("labels", "add", str(good), "--label", "benign", *opts, env=env)
    clipdex("detect", "train", env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, trust_env=False)


@contextmanager
def running_server(env: dict[str, str], workdir: Path, *extra: str,
                   token: str | None = TOKEN) -> Iterator[Server]:
    """`clipdex serve` on a free loopback port, stopped (SIGTERM, then SIGKILL) afterwards."""
    args = [CLIPDEX_BIN, "serve", "--host", "127.0.0.1", "--port", str(free_port()), *extra]
    if token:
        (workdir / "token.txt").write_text(token + "\n")
        args += ["--token-file", str(workdir / "token.txt")]
    log = workdir / f"server-{time.time_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{args[args.index('--port') + 1]}", proc, log)
    try:
        _wait_ready(server)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_ready(server: Server, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with server.client(None) as c:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise AssertionError(f"server exited {server.proc.returncode}:\n"
                                     + server.log.read_text(errors="replace"))
            try:
                if c.get("/v1/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise AssertionError("server did not become ready:\n" + server.log.read_text())


def png_bytes(seed: int, size: tuple[int, int] = (240, 180), fmt: str = "PNG") -> bytes:
    import io

    buf = io.BytesIO()
    scene(seed, size).save(buf, fmt)
    return buf.getvalue()
