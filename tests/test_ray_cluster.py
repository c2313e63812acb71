"""README's cluster recipe on one machine: a Ray head started with ``ray start``, then
``featcache extract --engine ray --ray-address auto`` from the command line, gives the local engine's cache.

The head runs in its own session (``ray start --head --block``) with its own temporary folder, so stopping
it (SIGTERM to its process group) touches no other Ray on the machine; the CLI finds it through
``RAY_ADDRESS``, which is where Ray's ``auto`` looks first (then at the cluster ``ray start`` last began here).
Both sides get the cluster's token as the README's several-machine recipe does (``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN``): Ray >= 2.59 authenticates every connection to the clusters it starts.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import _skip_or_fail, assert_same_datasets, copy_subset

from featcache.config import ExtractConfig
from featcache.errors import FeatcacheError
from featcache.extract import extract_features

SETTINGS = ["--backbone", "tiny", "--weights", "random", "--image-size", "32", "--augment-copies", "1",
            "--batch-size", "4", "--shard-rows", "8"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started as a user would (``ray start --head``): its address, temporary folder and the
    environment a driver needs to join it."""
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        _skip_or_fail('Ray is not installed (pip install "featcache[ray]")', service="Ray engine")
    temp = Path(tempfile.mkdtemp(prefix="fcray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed = []
    try:
        deadline = time.monotonic() + 180
        for line in head.stdout:
            printed.append(line)
            if "Ray runtime started" in line or time.monotonic() > deadline:
                break
        assert head.poll() is None and "Ray runtime started" in "".join(printed), "".join(printed)[-2000:]
        yield f"127.0.0.1:{port}", temp, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head stops every process it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_extract_with_ray_address_auto_runs_on_a_cluster_started_with_ray_start(ray_head, dev_data, tmp_path):
    address, temp, env = ray_head
    data = copy_subset(dev_data, tmp_path / "xrays", {"train/NORMAL": 4, "train/PNEUMONIA": 6, "test/NORMAL": 2,
                                                      "test/PNEUMONIA": 2})
    env = {**env, "RAY_ADDRESS": address, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-m", "featcache", "extract", "--data", str(data), "--cache-dir",
         str(tmp_path / "ray"), *SETTINGS, "--engine", "ray", "--ray-address", "auto"],
        env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    (local,) = extract_features(ExtractConfig(
        data_dir=data, cache_dir=tmp_path / "local", backbones=("tiny",), weights="random", image_size=32,
        augment_copies=1, batch_size=4, shard_rows=8, progress=False))
    on_cluster = tmp_path / "ray" / local.cache_path.name
    assert on_cluster.exists(), sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert_same_datasets(local.cache_path, on_cluster)
    # the actors ran on that head: its session folder holds their worker logs
    workers = list(temp.glob("session_*/logs/worker-*"))
    assert workers, sorted(p.name for p in temp.glob("session_*/logs/*"))


def test_a_driver_without_the_clusters_token_gets_one_line_that_says_so(ray_head, small_xrays, tmp_path):
    address, _, env = ray_head
    env = {**env, "RAY_ADDRESS": address, "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-m", "featcache", "extract", "--data", str(small_xrays), "--cache-dir",
         str(tmp_path / "cache"), *SETTINGS, "--engine", "ray", "--ray-address", "auto"],
        env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "refused this driver's token" in errors[0] and "Received: ray_address='auto'" in errors[0], \
        run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.h5"))


@pytest.fixture
def ray_record(tmp_path, monkeypatch):
    """Ray's record of the last ``ray start`` cluster, in a temporary folder of the test's own."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray" / "ray_current_cluster"


def test_a_stale_ray_start_record_means_a_local_ray_without_an_address_and_one_line_with_auto(ray_record, caplog):
    from featcache.ray_engine import reachable_address

    ray_record.write_text(f"127.0.0.1:{_free_port()}")  # a cluster killed without 'ray stop' leaves this behind
    assert reachable_address(None) == "local"
    assert "where nothing listens" in caplog.text and str(ray_record) in caplog.text
    with pytest.raises(FeatcacheError, match=r"Nothing listens at the Ray cluster address 127\.0\.0\.1:\d+ \(from "
                                             r".*ray_current_cluster\).*Received: ray_address='auto'"):
        reachable_address("auto")


def test_a_live_cluster_or_no_record_leaves_the_address_to_ray(ray_record):
    from featcache.ray_engine import reachable_address

    assert reachable_address(None) is None and reachable_address("auto") == "auto"  # no record: Ray decides
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        ray_record.write_text(f"127.0.0.1:{server.getsockname()[1]}")
        assert reachable_address(None) is None and reachable_address("auto") == "auto"
        assert reachable_address(f"127.0.0.1:{server.getsockname()[1]}") == f"127.0.0.1:{server.getsockname()[1]}"
    assert reachable_address("ray://head:10001") == "ray://head:10001"  # Ray Client: not probed here


def test_an_address_where_nothing_listens_is_one_line_whether_given_or_in_ray_address(ray_record, monkeypatch):
    from featcache.ray_engine import reachable_address

    dead = f"127.0.0.1:{_free_port()}"
    with pytest.raises(FeatcacheError, match=rf"{dead} \(from --ray-address\)"):
        reachable_address(dead)
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with pytest.raises(FeatcacheError, match=rf"{dead} \(from RAY_ADDRESS\)"):
        reachable_address(None)
