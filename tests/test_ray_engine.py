"""``extract --engine ray``: a Ray Data actor pool gives the local engine's cache, and resumes shard by shard.

One local Ray (``ray.init(num_cpus=2)``) serves the module; each extract starts its actors again (about
20-30 s of TensorFlow imports on 2 busy cores), so the module runs the Ray engine twice only.
"""

from __future__ import annotations

import shutil
import sys

import pytest
from conftest import _skip_or_fail, assert_same_datasets, copy_subset
from pipeline import run_cli

from featcache.cache import read_manifest
from featcache.errors import FeatcacheError
from featcache.extract import extract_features
from featcache.shards import read_keys
from featcache.verify import verify_cache

SETTINGS = dict(backbones=("tiny",), weights="random", augment_copies=1, image_size=32, batch_size=4, seed=0,
                progress=False, shard_rows=8)  # 22 rows (12 train images and a copy each, 4 val, 4 test): 3 shards


def _shards(cache_path):
    return sorted(cache_path.parent.glob(f"{cache_path.stem}.shards/*.h5"))


def _manifest(cache_path) -> dict:
    manifest = read_manifest(cache_path)
    manifest.pop("created")
    return manifest


@pytest.fixture(scope="module")
def local_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        _skip_or_fail('Ray Data is not installed (pip install "featcache[ray]")', service="Ray engine")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a stale record
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def builds(local_ray, dev_data, tmp_path_factory):
    """The same small X-ray folder extracted by each engine into its own cache folder."""
    from featcache.config import ExtractConfig

    root = tmp_path_factory.mktemp("ray-engine")
    data = copy_subset(dev_data, root / "xrays", {"train/NORMAL": 4, "train/PNEUMONIA": 6, "test/NORMAL": 2,
                                                  "test/PNEUMONIA": 2})

    def config(cache_dir, **overrides):
        return ExtractConfig(data_dir=data, cache_dir=cache_dir, **{**SETTINGS, **overrides})

    (local,) = extract_features(config(root / "local"))
    (on_ray,) = extract_features(config(root / "ray", engine="ray", ray_actors=2))
    return {"root": root, "config": config, "local": local, "ray": on_ray}


def test_the_ray_engine_writes_the_local_engines_cache(builds):
    local, on_ray = builds["local"], builds["ray"]
    assert on_ray.cache_path.name == local.cache_path.name  # same fingerprint: the engine is not a setting
    assert on_ray.computed_rows == local.computed_rows == 22 and on_ray.reused_rows == 0
    assert [p.name for p in _shards(on_ray.cache_path)] == [p.name for p in _shards(local.cache_path)]
    assert len(_shards(on_ray.cache_path)) == 3  # the actors wrote whole shards, planned as the local engine packs
    assert_same_datasets(local.cache_path, on_ray.cache_path)  # features, pooled, labels, ...: bit for bit
    assert _manifest(on_ray.cache_path) == _manifest(local.cache_path)
    assert not list(on_ray.cache_path.parent.glob("*.partial"))  # nothing left in progress
    assert verify_cache(on_ray.cache_path).ok


def test_a_lost_shard_is_all_a_rerun_computes_with_either_engine(builds):
    root, config, local = builds["root"], builds["config"], builds["local"]
    cache_dir = root / "resume"
    shutil.copytree(root / "ray", cache_dir)
    cache = cache_dir / local.cache_path.name
    first, second, third = _shards(cache)
    kept = {p.name: p.stat().st_mtime_ns for p in (first, third)}
    lost = len(read_keys(second))
    cache.unlink()  # a run killed before its master file, with an actor killed before its shard's rename
    second.unlink()
    (resumed,) = extract_features(config(cache_dir, engine="ray", ray_actors=2))
    assert (resumed.computed_rows, resumed.reused_rows) == (lost, 22 - lost) and lost in (6, 8)
    assert [p.name for p in _shards(cache)] == [first.name, second.name, third.name]
    assert {p.name: p.stat().st_mtime_ns for p in (first, third)} == kept  # untouched
    assert_same_datasets(local.cache_path, cache)
    assert _manifest(cache) == _manifest(local.cache_path)
    # the local engine resumes a cache the Ray engine started
    lost = len(read_keys(third))
    cache.unlink()
    third.unlink()
    (by_local,) = extract_features(config(cache_dir))
    assert (by_local.computed_rows, by_local.reused_rows) == (lost, 22 - lost) and lost in (6, 8)
    assert_same_datasets(local.cache_path, cache)


def test_files_that_fail_to_decode_in_the_actors_are_skipped_and_listed_as_the_local_engine_does(
        local_ray, dev_data, bad_inputs, tmp_path):
    from featcache.config import ExtractConfig

    data = copy_subset(dev_data, tmp_path / "xrays", {"train/NORMAL": 2, "train/PNEUMONIA": 3, "test/NORMAL": 1,
                                                      "test/PNEUMONIA": 1})
    shutil.copyfile(bad_inputs / "truncated.jpeg", data / "test" / "NORMAL" / "truncated.jpeg")
    shutil.copyfile(bad_inputs / "notes.jpeg", data / "test" / "PNEUMONIA" / "notes.jpeg")
    settings = {**SETTINGS, "augment_copies": 0}
    (local,) = extract_features(ExtractConfig(data_dir=data, cache_dir=tmp_path / "local", **settings))
    (on_ray,) = extract_features(ExtractConfig(data_dir=data, cache_dir=tmp_path / "ray", engine="ray",
                                               ray_actors=2, **settings))
    skipped = sorted(s["path"] for s in local.skipped)
    assert skipped == ["test/NORMAL/truncated.jpeg", "test/PNEUMONIA/notes.jpeg"]
    assert sorted(on_ray.skipped, key=lambda s: s["path"]) == sorted(local.skipped, key=lambda s: s["path"])
    assert on_ray.computed_rows == local.computed_rows == 7 and on_ray.counts == local.counts
    assert_same_datasets(local.cache_path, on_ray.cache_path)
    assert _manifest(on_ray.cache_path) == _manifest(local.cache_path)


def test_engine_options_are_checked(tmp_path):
    from featcache.config import ExtractConfig

    with pytest.raises(FeatcacheError, match="--engine must be one of"):
        ExtractConfig(data_dir=tmp_path, engine="spark")
    with pytest.raises(FeatcacheError, match="need --engine ray"):
        ExtractConfig(data_dir=tmp_path, ray_actors=2)
    with pytest.raises(FeatcacheError, match="--ray-actors must be >= 1"):
        ExtractConfig(data_dir=tmp_path, engine="ray", ray_actors=0)


def test_engine_ray_without_ray_is_one_line_naming_the_extra(small_xrays, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as where it is not installed
    result = run_cli("extract", "--data", small_xrays, "--cache-dir", tmp_path / "cache", "--backbone", "tiny",
                     "--weights", "random", "--image-size", "32", "--no-progress", "--engine", "ray")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and 'pip install "featcache[ray]"' in lines[0], result.output
    assert not (tmp_path / "cache").exists()  # refused before any work


DRIVER = """
import sys, time
import featcache.ray_engine as ray_engine
from featcache.config import ExtractConfig
from featcache.extract import extract_features


class SlowWriter(ray_engine.ShardWriter):  # sent to the actors by value: every shard after the first waits
    calls = 0

    def __call__(self, batch):
        SlowWriter.calls += 1
        if SlowWriter.calls > 1:
            time.sleep(3)
        return super().__call__(batch)


ray_engine.ShardWriter = SlowWriter
data, cache, address = sys.argv[1:]
extract_features(ExtractConfig(data_dir=data, cache_dir=cache, engine="ray", ray_actors=2, ray_address=address,
                               **{SETTINGS}))
"""


def test_sigkill_of_the_ray_driver_then_a_rerun_computes_only_the_missing_shards(builds, local_ray):
    import os
    import signal
    import subprocess
    import time

    root, config, local = builds["root"], builds["config"], builds["local"]
    cache_dir = root / "killed"
    shards = cache_dir / f"{local.cache_path.stem}.shards"
    address = local_ray.get_runtime_context().gcs_address  # the driver joins the module's cluster
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER.replace("{SETTINGS}", repr({**SETTINGS, "shard_rows": 4})),
         str(config(root).data_dir), str(cache_dir), address],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(shards.glob("*.h5")) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, f"the driver ended before its first shard: {driver.stderr.read()[-2000:]}"
        assert list(shards.glob("*.h5")), "no shard within 300 s"
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    assert not (cache_dir / local.cache_path.name).exists()  # killed before its master file
    done = sum(len(read_keys(p)) for p in shards.glob("*.h5"))
    assert 0 < done < 22
    (resumed,) = extract_features(config(cache_dir, engine="ray", ray_actors=2, shard_rows=4))
    assert (resumed.computed_rows, resumed.reused_rows) == (22 - done, done)
    assert_same_datasets(local.cache_path, resumed.cache_path)
    assert _manifest(resumed.cache_path) == {**_manifest(local.cache_path), "shards": _manifest(resumed.cache_path)["shards"]}
    assert not list(shards.glob("*.incomplete"))
