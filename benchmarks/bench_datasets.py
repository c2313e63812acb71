"""Benchmark of the data-set paths of issue 8: DICOM decoding beside JPEG, and the patient rules at CheXpert scale.

1. Decode, side by side over --rounds (order alternated): --images gray dev JPEGs with ``load_image`` at
   --image-size, and their DICOM twins (8-bit MONOCHROME2, and 12-bit-in-16 with rescale and a window),
   written once under --work-dir with pydicom. Prints ms per image of each kind, the DICOM/JPEG ratio, and
   how many twins decoded to exactly the JPEG's pixels.
2. ``patients.assign_patients`` on --paths synthetic CheXpert paths (``train/patientNNNNN/studyS/viewV_...jpg``,
   every name repeated, so the folder rule runs for each) and on as many MIMIC-like paths with a
   --patient-pattern; prints seconds and paths per second.

Reproduce: python benchmarks/bench_datasets.py [--images 40] [--rounds 3] [--paths 224316]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/chest_xray_dev")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/featcache-bench-datasets"))
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paths", type=int, default=224_316)  # CheXpert-v1.0 train.csv rows
    args = parser.parse_args()
    bench_decode(args)
    bench_patients(args.paths)


def bench_decode(args) -> None:
    from datasets import dicom_variants, gray_sources

    from featcache.decode import load_image

    half = args.images // 2
    sources = gray_sources(args.data, "train", "NORMAL", half) + gray_sources(args.data, "train", "PNEUMONIA", half)
    kinds = {"jpeg": sources, "dicom 8-bit": [], "dicom 12-bit windowed": []}
    for i, source in enumerate(sources):
        twins = dicom_variants(source, args.work_dir / f"{i:03d}")
        kinds["dicom 8-bit"].append(twins["mono2_8bit"])
        kinds["dicom 12-bit windowed"].append(twins["window_16bit"])
    for files in kinds.values():  # warm-up: traces and file cache
        load_image(files[0], args.image_size)
    seconds = {kind: [] for kind in kinds}
    for round_ in range(args.rounds):
        for kind in (list(kinds) if round_ % 2 == 0 else list(reversed(kinds))):
            started = time.perf_counter()
            images = [load_image(f, args.image_size) for f in kinds[kind]]
            seconds[kind].append((time.perf_counter() - started) / len(images))
    reference = [load_image(f, args.image_size) for f in sources]
    print(f"decode at {args.image_size} px, {len(sources)} images, median of {args.rounds} rounds:")
    base = np.median(seconds["jpeg"])
    for kind, values in seconds.items():
        equal = sum(np.array_equal(load_image(f, args.image_size), r) for f, r in zip(kinds[kind], reference))
        print(f"  {kind:<22} {1000 * np.median(values):7.2f} ms/image  x{np.median(values) / base:.2f}  "
              f"equal to the JPEG's pixels: {equal}/{len(sources)}")


def bench_patients(n: int) -> None:
    from featcache.patients import assign_patients

    chexpert = [f"CheXpert-v1.0/train/patient{i // 3:05d}/study{i % 3 // 2 + 1}/view{i % 2 + 1}_frontal.jpg"
                for i in range(n)]
    mimic = [f"files/p1{i % 10}/p1{i // 4:07d}/s5{i:07d}/{i:08x}-bde0afdd-112c0b34.jpg" for i in range(n)]
    for name, paths, pattern in (("CheXpert tree (folder rule)", chexpert, None),
                                 ("MIMIC names (--patient-pattern)", mimic, r"p1\d/(p\d+)/")):
        started = time.perf_counter()
        ids, _ = assign_patients(paths, pattern)
        took = time.perf_counter() - started
        print(f"patients, {name}: {len(paths):,} paths -> {len(set(ids.values())):,} patients in {took:.2f} s "
              f"({len(paths) / took:,.0f} paths/s)")


if __name__ == "__main__":
    main()
