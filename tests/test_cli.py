"""The CLI's wiring: exit codes, one-line errors, summaries (extract and info)."""

import shutil

import pytest
from typer.testing import CliRunner

from featcache.cachewrite import CacheLock
from featcache.cli import app

runner = CliRunner()
FAST = ["--backbone", "tiny", "--weights", "random", "--image-size", "64", "--augment-copies", "1", "--no-progress"]


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_extract_then_info(small_xrays, tmp_path, bad_inputs):
    shutil.copyfile(bad_inputs / "notes.jpeg", small_xrays / "test" / "NORMAL" / "notes.jpeg")
    result = _run("extract", "--data", small_xrays, "--cache-dir", tmp_path / "c", *FAST)
    assert result.exit_code == 0, result.output
    assert "originals: train" in result.output and "skipped 1 unreadable files" in result.output
    assert "test/NORMAL/notes.jpeg" in result.output
    info = _run("info", tmp_path / "c")
    assert info.exit_code == 0 and "backbone tiny" in info.output and "skipped 1" in info.output


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/xrays"], "does not exist"),
    (["--augment-copies", "-1"], "--augment-copies must be >= 0"),
    (["--image-size", "50"], "multiple of 32"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--weights", "/nonexistent/w.h5"], "does not exist"),
])
def test_extract_errors_are_one_red_line_and_exit_1(small_xrays, tmp_path, args, message):
    # later options override earlier ones, so ``args`` replaces one setting of the fast run
    result = _run("extract", "--data", small_xrays, "--cache-dir", tmp_path / "c", *FAST, *args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output


def test_second_writer_exits_1(small_xrays, tmp_path):
    with CacheLock(tmp_path / "c" / ".tiny.lock"):
        result = _run("extract", "--data", small_xrays, "--cache-dir", tmp_path / "c", *FAST)
    assert result.exit_code == 1 and "Another featcache process" in result.output


def test_info_without_caches(tmp_path):
    result = _run("info", tmp_path)
    assert result.exit_code == 1 and "No caches" in result.output
