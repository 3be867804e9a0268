"""Output directories appear whole or not at all (lenscache.publish)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lenscache.publish import publish_dir, replace_dir


def _listing(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_publish_dir_writes_then_replaces_an_old_output_whole(tmp_path):
    out = tmp_path / "results"
    assert publish_dir(out, lambda d: (d / "a.txt").write_text("one")) == 3
    assert (out / "a.txt").read_text() == "one"
    publish_dir(out, lambda d: (d / "b.txt").write_text("two"))
    assert _listing(out) == ["b.txt"]  # the old directory went as a whole, not merged
    assert _listing(tmp_path) == ["results"]  # no hidden temporary or old directory is left


def test_a_failing_write_leaves_the_old_output_and_no_partial(tmp_path):
    out = tmp_path / "results"
    publish_dir(out, lambda d: (d / "a.txt").write_text("one"))

    def fail(d: Path) -> None:
        (d / "half.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        publish_dir(out, fail)
    assert _listing(out) == ["a.txt"] and (out / "a.txt").read_text() == "one"
    assert _listing(tmp_path) == ["results"]


def test_the_published_directory_gets_the_umask_mode_not_0700(tmp_path):
    old = os.umask(0o022)
    try:
        out = publish_dir(tmp_path / "r", lambda d: d) and tmp_path / "r"
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755


def test_replace_dir_moves_a_finished_directory_over_a_file_or_directory(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "x").write_text("new")
    out.write_text("an old file")
    replace_dir(work, out)
    assert (out / "x").read_text() == "new" and not work.exists()
    assert _listing(tmp_path) == ["out"]
