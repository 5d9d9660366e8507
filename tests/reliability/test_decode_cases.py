"""Every file of the bad-input corpus lands in its expected state, and nothing else escapes."""

from __future__ import annotations

from pathlib import Path

import pytest

from indexer.decode import DecodeLimits, load_image
from indexer.errors import DecodeError
from tests.reliability.corpus import CorpusCase, build_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[CorpusCase]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root)


def _outcome(path: Path) -> str:
    try:
        image, meta = load_image(str(path), DecodeLimits(), min_side=448)
    except DecodeError as exc:
        assert exc.path == str(path)
        return exc.reason
    assert image.mode == "RGB" and image.size[0] > 0 and image.size[1] > 0
    assert meta.width > 0 and meta.height > 0
    return "ok"


def test_every_case_lands_in_its_expected_state(corpus: tuple[Path, list[CorpusCase]]) -> None:
    root, cases = corpus
    got = {case.filename: _outcome(root / case.filename) for case in cases}
    wanted = {case.filename: case.expected for case in cases}
    assert got == wanted


def test_corpus_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    cases = build_corpus(first)
    assert cases == build_corpus(second)
    for case in cases:
        if (first / case.filename).is_file() and case.expected != "too_large":
            assert (first / case.filename).read_bytes() == (second / case.filename).read_bytes()


def test_corpus_covers_every_reason(corpus: tuple[Path, list[CorpusCase]]) -> None:
    reasons = {case.expected for case in corpus[1]}
    assert reasons >= {
        "ok", "unidentified", "format_not_allowed", "decompression_bomb",
        "too_large", "truncated", "corrupt", "io_error",
    }
