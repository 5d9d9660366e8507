"""The server's guards without a model: settings, queue bound (503), timeout (504), errors."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from indexer.errors import ClassifierError, DecodeError, QueryError
from search.server import ApiError, Gate, ServeSettings, Worker, api_error, is_loopback
from search.service import NoDetectorError, UnknownIdError


class _Direct:
    """Stands in for SearchService: `call` just runs the function."""

    def call(self, fn: Any, *args: Any) -> Any:
        return fn(*args)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True),
                                            ("::1", True), ("127.3.4.5", True),
                                            ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.4", False), ("example.org", False)])
def test_loopback_detection(host, loopback):
    assert is_loopback(host) is loopback


def test_non_loopback_needs_a_token_and_settings_are_validated():
    with pytest.raises(ValueError, match="token-file"):
        ServeSettings(store="s", host="0.0.0.0")
    assert ServeSettings(store="s", host="0.0.0.0", token="t" * 20).host == "0.0.0.0"
    assert "t" * 20 not in repr(ServeSettings(store="s", token="t" * 20))  # never logged
    for bad in ({"max_body_bytes": 0}, {"max_pending": 0}, {"timeout_s": 0}, {"port": 70000},
                {"token": "  "}):
        with pytest.raises(ValueError):
            ServeSettings(store="s", **bad)


def test_a_full_queue_answers_503_and_frees_its_slot_when_work_ends():
    release = threading.Event()
    worker = Worker(_Direct(), timeout_s=5)  # type: ignore[arg-type]
    gate = Gate(1)

    async def scenario() -> None:
        first = asyncio.ensure_future(worker.run(gate, release.wait, 5))
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as busy:
            await worker.run(gate, lambda: 1)
        assert busy.value.status == 503 and busy.value.headers == {"Retry-After": "1"}
        release.set()
        assert await first is True
        assert await worker.run(gate, lambda: 2) == 2

    asyncio.run(scenario())
    worker.executor.shutdown()


def test_a_slow_request_answers_504_and_holds_its_slot_until_it_really_ends():
    release = threading.Event()
    worker = Worker(_Direct(), timeout_s=0.1)  # type: ignore[arg-type]
    gate = Gate(1)

    async def scenario() -> None:
        with pytest.raises(ApiError) as slow:
            await worker.run(gate, release.wait, 5)
        assert slow.value.status == 504
        assert gate.pending == 1  # the thread is still busy: the queue bound still counts it
        release.set()
        for _ in range(100):
            if gate.pending == 0:
                break
            await asyncio.sleep(0.01)
        assert gate.pending == 0

    asyncio.run(scenario())
    worker.executor.shutdown()


def test_unexpected_exceptions_from_work_propagate_but_library_errors_become_4xx():
    worker = Worker(_Direct(), timeout_s=5)  # type: ignore[arg-type]

    def refuse() -> None:
        raise DecodeError("format_not_allowed", "TIFF is not allowed")

    with pytest.raises(ApiError) as err:
        asyncio.run(worker.run(Gate(1), refuse))
    assert (err.value.status, err.value.code) == (415, "format_not_allowed")
    worker.executor.shutdown()


@pytest.mark.parametrize("error, status", [
    (DecodeError("too_large", "x"), 413), (DecodeError("truncated", "x"), 422),
    (DecodeError("unidentified", "x"), 415), (UnknownIdError("x"), 404),
    (NoDetectorError("x"), 409), (ClassifierError("x"), 409), (QueryError("x"), 400)])
def test_library_errors_map_to_statuses(error, status):
    assert api_error(error).status == status


def _asgi_call(middleware: Any, chunks: list[bytes], headers: list[tuple[bytes, bytes]]
               ) -> tuple[list[dict[str, Any]], int]:
    """Feed a request body in chunks; return what was sent and how many chunks were read."""
    sent: list[dict[str, Any]] = []
    read = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        i = read - 1
        if i >= len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/v1/search", "headers": headers}
    asyncio.run(middleware(scope, receive, send))
    return sent, read


async def _echo_length_app(scope: Any, receive: Any, send: Any) -> None:
    """A stand-in endpoint that reads the whole body, then answers 200 (or 400 on a cut)."""
    total, more = 0, True
    try:
        while more:
            message = await receive()
            if message["type"] != "http.request":
                raise RuntimeError("disconnected")
            total += len(message.get("body", b""))
            more = message.get("more_body", False)
        status = 200
    except Exception:
        status = 400  # what FastAPI answers when body parsing fails
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": str(total).encode()})


def test_chunked_body_is_cut_at_the_limit_without_reading_the_rest():
    from search.limits import BodyLimitMiddleware

    guard = BodyLimitMiddleware(_echo_length_app, max_bytes=1000)
    sent, read = _asgi_call(guard, [b"x" * 400] * 50, [])  # no Content-Length: chunked
    assert sent[0]["status"] == 413 and read == 3  # stopped at the chunk that passed 1000
    assert len([m for m in sent if m["type"] == "http.response.start"]) == 1
    sent, _ = _asgi_call(guard, [b"x" * 400] * 2, [])
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"800"
    sent, read = _asgi_call(guard, [b"x"], [(b"content-length", b"5000")])
    assert sent[0]["status"] == 413 and read == 0  # refused from the header alone
    sent, _ = _asgi_call(guard, [b"x"], [(b"content-length", b"-1")])
    assert sent[0]["status"] == 400


def test_token_middleware_compares_the_whole_bearer_token():
    from search.limits import TokenAuthMiddleware

    guard = TokenAuthMiddleware(_echo_length_app, token="s3cret-token-value",
                                public=frozenset({"/v1/health"}))
    for header, status in [(b"Bearer s3cret-token-value", 200), (b"bearer s3cret-token-value", 200),
                           (b"Bearer s3cret", 401), (b"Basic s3cret-token-value", 401),
                           (b"s3cret-token-value", 401), (b"", 401)]:
        sent, _ = _asgi_call(guard, [b""], [(b"authorization", header)] if header else [])
        assert sent[0]["status"] == status, header
