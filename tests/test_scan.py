import os

import pytest

from indexer.scan import scan
from indexer.types import Failure, ScanEntry


def _paths(items):
    return sorted(os.path.basename(i.path) for i in items if isinstance(i, ScanEntry))


def test_recursive_allow_listed_names_only(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["x.JPG", "a/y.png", "a/b/z.webp", "notes.txt", "a/b/w.gif", "a/v.tiff"]:
        (tmp_path / name).write_bytes(b"data")
    assert _paths(scan([str(tmp_path)])) == ["v.tiff", "w.gif", "x.JPG", "y.png", "z.webp"]


def test_overlapping_roots_yield_each_file_once(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"1")
    items = list(scan([str(tmp_path), str(tmp_path / "sub")]))
    assert len(items) == 1


def test_symlink_loop_and_link_leaving_root_are_failures_not_hangs(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    os.symlink(outside, root / "leak.png")
    os.symlink(root / "loop2.png", root / "loop1.png")
    os.symlink(root / "loop1.png", root / "loop2.png")
    os.symlink(root, root / "dirloop")  # symlinked dirs are not followed
    fails = {os.path.basename(i.path): i for i in scan([str(root)]) if isinstance(i, Failure)}
    assert set(fails) == {"leak.png", "loop1.png", "loop2.png"}
    assert all(f.reason == "io_error" for f in fails.values())
    assert "leaves" in fails["leak.png"].message


def test_link_inside_root_is_followed(tmp_path):
    (tmp_path / "real.png").write_bytes(b"x")
    os.symlink(tmp_path / "real.png", tmp_path / "alias.png")
    assert _paths(scan([str(tmp_path)])) == ["alias.png", "real.png"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_named_like_an_image_is_a_failure(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    (item,) = scan([str(tmp_path)])
    assert isinstance(item, Failure) and "regular" in item.message


def test_store_directory_inside_root_is_skipped(tmp_path):
    (tmp_path / "x.clipdex").mkdir()
    (tmp_path / "x.clipdex" / "thumb.png").write_bytes(b"x")
    assert list(scan([str(tmp_path)])) == []


def test_missing_root_is_reported(tmp_path):
    (item,) = scan([str(tmp_path / "nope")])
    assert isinstance(item, Failure)
