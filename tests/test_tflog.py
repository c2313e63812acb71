"""The CLI's start-up output: TensorFlow's CPU-only notices are filtered, real warnings are not."""

import os
import subprocess
import sys

import numpy as np

from conftest import REPO, write_png
from featcache.tflog import filtered_stderr, quiet_tensorflow_startup

NOISE_MARKERS = ("cuInit", "E0000", "absl::InitializeLog", "cudart_stub", "oneDNN custom operations",
                 "cpu_feature_guard")


def test_a_real_command_prints_no_tensorflow_start_up_notices(tmp_path):
    rng = np.random.default_rng(0)
    for rel in ("train/NORMAL/person1_a.png", "train/NORMAL/person2_a.png", "train/PNEUMONIA/person3_a.png",
                "train/PNEUMONIA/person4_a.png", "test/NORMAL/person1_b.png", "test/PNEUMONIA/person5_b.png"):
        write_png(tmp_path / "data" / rel, rng.integers(0, 256, (40, 50, 1), dtype=np.uint8))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "featcache", "extract", "--data", str(tmp_path / "data"), "--cache-dir",
         str(tmp_path / "cache"), "--backbone", "tiny", "--weights", "random", "--image-size", "32",
         "--augment-copies", "0", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "originals: train" in result.stdout
    noisy = [line for line in result.stderr.splitlines() if any(m in line for m in NOISE_MARKERS)]
    assert noisy == []
    # featcache's own warnings still get through: person1 is in test/ and train/
    assert "1 patient ids appear in both test/ and train/val/" in result.stderr


def test_filtered_stderr_drops_only_the_known_notices(capfd):
    with filtered_stderr():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
                    b"I0000 00:00:1.2 1 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
                    b"not be used.\n"
                    b"E0000 00:00:1.3 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n"
                    b"E0000 00:00:1.4 1 some_kernel.cc:9] a real error\n")
        print("UserWarning: a real warning", file=sys.stderr)
    err = capfd.readouterr().err
    assert "a real error" in err and "a real warning" in err
    assert "cuInit" not in err and "cudart_stub" not in err and "absl::InitializeLog" not in err


def test_a_users_log_level_leaves_tensorflow_alone(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.delitem(sys.modules, "tensorflow")  # as if not imported yet
    finders = list(sys.meta_path)
    quiet_tensorflow_startup()
    assert sys.meta_path == finders and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
