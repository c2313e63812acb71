"""One end-to-end run of the CLI on the real dev X-rays, shared by the evaluate/export/predict tests.

``extract -> train-head -> evaluate -> export`` with the tiny backbone at 64 px and random weights runs
once per test session (about 40 s on 2 CPU cores) into the session's base temporary folder; tests that
change files work on copies (``copy_run``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

FAST = ["--backbone", "tiny", "--weights", "random", "--image-size", "64", "--augment-copies", "1", "--no-progress"]


def run_cli(*args):
    from featcache.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def dev_pipeline(tmp_path_factory, dev_data: Path) -> dict:
    """Paths of the shared run: ``root``, ``data``, ``cache_dir``, ``cache``, ``run_dir``, ``model``, and the
    CLI ``outputs`` of each stage."""
    root = tmp_path_factory.getbasetemp() / "dev-pipeline"
    cache_dir, model = root / "cache", root / "model"
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        outputs = {}
        for name, args in (
            ("extract", ["extract", "--data", dev_data, "--cache-dir", cache_dir, *FAST]),
            ("train-head", ["train-head", "--cache-dir", cache_dir, "--trials", "2", "--no-progress"]),
            ("evaluate", ["evaluate", "--no-progress", "--cache-dir", cache_dir, "--bootstrap", "300"]),
            ("export", ["export", "--cache-dir", cache_dir, "--out", model]),
        ):
            result = run_cli(*args)
            assert result.exit_code == 0, f"{name}: {result.output} {result.exception!r}"
            outputs[name] = result.output
            (root / f"{name}.out").write_text(result.output)
        (root / "done").touch()
    caches = sorted(cache_dir.glob("tiny-*.h5"))
    caches = [c for c in caches if not c.name.endswith(".weights.h5")]
    return {
        "root": root, "data": dev_data, "cache_dir": cache_dir, "cache": caches[0],
        "run_dir": cache_dir / "runs" / caches[0].stem, "model": model,
        "outputs": {p.stem: p.read_text() for p in root.glob("*.out")},
    }


def copy_run(run: dict, target: Path) -> dict:
    """A private copy of the shared cache folder (and export), for tests that change or break files."""
    shutil.copytree(run["cache_dir"], target / "cache")
    shutil.copytree(run["model"], target / "model")
    cache = target / "cache" / run["cache"].name
    return {**run, "cache_dir": target / "cache", "cache": cache, "run_dir": target / "cache" / "runs" / cache.stem,
            "model": target / "model"}
