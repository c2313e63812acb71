"""One backbone replica per device (issue 9, part 3), checked on two logical CPU devices.

TensorFlow fixes its logical devices when it first initialises, so each check runs in a fresh interpreter
that splits the CPU in two before anything else touches TensorFlow.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

TWO_CPUS = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
devices = [d.name for d in tf.config.list_logical_devices("CPU")]
assert len(devices) == 2, devices
"""


def _run(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", TWO_CPUS + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_two_replicas_compute_the_features_of_one(dev_data, tmp_path):
    images = sorted((dev_data / "train" / "PNEUMONIA").glob("*.jpeg"))[:12]  # three batches of 4: both replicas
    out = tmp_path / "features.npz"
    printed = _run("""
        import sys, numpy as np
        from featcache.backbones import build_extractor, get_backbone_spec, load_backbone
        from featcache.decode import load_image
        from featcache.replicas import make_forward
        spec = get_backbone_spec("tiny")
        extractor = build_extractor(spec, load_backbone(spec, 64, "random", 0), 64)
        images = np.stack([load_image(p, 64) for p in sys.argv[2:]])
        batches = [images[i:i + 4] for i in range(0, len(images), 4)]
        one, two = make_forward(extractor), make_forward(extractor, devices)
        single = [one(batch) for batch in batches]
        futures = [two.submit(batch) for batch in batches]  # dealt to the replicas in turn, run concurrently
        dealt = [future.result() for future in futures]
        two.close()
        np.savez(sys.argv[1], **{f"{side}{j}": np.concatenate([r[j] for r in results])
                                 for side, results in (("one", single), ("two", dealt)) for j in range(2)})
        print("replicas", two.replicas, "devices", sorted({d for d, _ in two._steps}))
    """, str(out), *map(str, images))
    assert "replicas 2" in printed and "CPU:0" in printed and "CPU:1" in printed
    saved = np.load(out)
    assert saved["one0"].shape[0] == 12 and saved["one0"].std() > 0
    np.testing.assert_array_equal(saved["two0"], saved["one0"])  # maps
    np.testing.assert_array_equal(saved["two1"], saved["one1"])  # pooled


def test_extract_on_two_replicas_writes_the_cache_of_one(small_xrays, tmp_path):
    from tests.conftest import assert_same_datasets

    caches = {}
    for name, replicate in (("one", False), ("two", True)):
        cache_dir = tmp_path / name
        printed = _run("""
            import sys, json
            from pathlib import Path
            import featcache.compute as compute
            import featcache.extract as extract
            from featcache.config import ExtractConfig
            if sys.argv[3] == "1":
                compute.replica_devices = lambda: devices
            config = ExtractConfig(data_dir=Path(sys.argv[1]), backbones=("tiny",), weights="random",
                                   augment_copies=1, image_size=32, batch_size=8, seed=0,
                                   cache_dir=Path(sys.argv[2]), progress=False)
            summary = extract.extract_features(config)[0]
            print(json.dumps({"cache": str(summary.cache_path), "rows": summary.computed_rows}))
        """, str(small_xrays), str(cache_dir), "1" if replicate else "0")
        caches[name] = json.loads(printed.strip().splitlines()[-1])
    assert caches["one"]["rows"] == caches["two"]["rows"] > 0
    assert Path(caches["one"]["cache"]).name == Path(caches["two"]["cache"]).name  # same fingerprint
    assert_same_datasets(Path(caches["one"]["cache"]), Path(caches["two"]["cache"]))
