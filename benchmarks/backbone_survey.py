"""One architecture per keras.applications family through featcache's registry: parameter count against
``keras.applications.X(include_top=False, weights=None)``, feature shape at a small side, and whether the
extractor (featcache's preprocessing layers + the backbone) saved as .keras reloads in safe mode to the same
outputs. Random weights, CPU; seconds per architecture include building it twice, saving and reloading.

    PYTHONPATH=$PWD python benchmarks/backbone_survey.py [NAME ...]
"""

import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from featcache.backbones import build_extractor, get_backbone_spec, load_backbone

FAMILIES = ["densenet121", "efficientnetv2b0", "convnext_tiny", "mobilenetv3small", "efficientnetb0", "inceptionv3",
            "xception", "resnet50v2", "mobilenet", "mobilenetv2", "nasnetmobile", "inceptionresnetv2", "vgg19",
            "resnet50"]


def survey(name: str, folder: Path) -> str:
    started = time.perf_counter()
    spec = get_backbone_spec(name)
    size = 96 if spec.min_size > 64 else 64
    backbone = load_backbone(spec, size, "random", seed=0)
    reference = getattr(keras.applications, spec.architecture)(include_top=False, weights=None,
                                                               input_shape=(size, size, 3))
    extractor = build_extractor(spec, backbone, size)
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    out = np.asarray(extractor(images, training=False))
    extractor.save(folder / f"{spec.name}.keras")
    reloaded = keras.saving.load_model(folder / f"{spec.name}.keras", safe_mode=True)
    diff = float(np.max(np.abs(np.asarray(reloaded(images, training=False)) - out)))
    return (f"{name}: size {size} shape {out.shape[1:]} params {backbone.count_params()} keras "
            f"{reference.count_params()} safe-mode diff {diff:.2g} ({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for name in sys.argv[1:] or FAMILIES:
            try:
                print(survey(name, Path(tmp)), flush=True)
            except Exception as exc:  # noqa: BLE001 - a survey reports every family
                print(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
