"""``featcache verify``: re-check a cache or an export folder end to end, one line per check and a verdict.

A cache: header, manifest and layout (every shard file present and the one it was built from); each shard
read whole against its own SHA-256s; every dataset's SHA-256 (all splits; /features streamed, HDF5's
fletcher32 checked on the way) and value ranges; counts and row/file consistency; the split registry.
An export: model.json is featcache's and unedited, the folder holds only what an export writes,
model.keras has the recorded SHA-256 and loads in safe mode, the SavedModel loads, its threshold is the
card's, and both artifacts agree on two synthetic images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.cache import list_caches, open_cache
from featcache.cardtext import render_model_card
from featcache.checksums import check_dataset, present_datasets, read_checked
from featcache.data import SPLITS, read_split_registry
from featcache.errors import DamagedFileError, FeatcacheError
from featcache.integrity import first_line, load_keras_checked
from featcache.shards import check_shard
from featcache.modelcard import (
    CARD_FILE,
    KERAS_FILE,
    MODEL_CARD_FILE,
    SAVED_MODEL_DIR,
    SIGNATURE,
    THRESHOLD_SIGNATURE,
    check_export_folder,
    read_card,
)

FIX_EXPORT = "re-run 'featcache export --force'."
AGREEMENT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Verification:
    """The checks of one cache file or export folder, in the order they ran."""

    target: Path
    kind: str  # "cache" or "export"
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def run(self, name: str, check) -> bool:
        """Run ``check()`` (returns a detail string); a FeatcacheError is a failed check, not an abort."""
        try:
            self.checks.append(Check(name, True, check() or "ok"))
        except FeatcacheError as exc:
            self.checks.append(Check(name, False, str(exc)))
        return self.checks[-1].ok


def verify_path(target: str | Path) -> list[Verification]:
    """Verify a cache file, an export folder (it holds model.json), or every cache in a folder.

    Raises:
        FeatcacheError: ``target`` does not exist, or is a folder with neither an export nor a cache.
    """
    target = Path(target)
    if target.is_dir() and (target / CARD_FILE).exists():
        return [verify_export(target)]
    if target.is_dir():
        caches = list_caches(target)
        if not caches:
            raise FeatcacheError(f"{target} holds neither a featcache export ({CARD_FILE}) nor a cache (*.h5); pass a "
                                 f"cache file or an export folder. Received: target={str(target)!r}")
        return [verify_cache(path) for path in caches]
    if not target.is_file():
        raise FeatcacheError(f"{target} does not exist; pass a cache file or an export folder. "
                             f"Received: target={str(target)!r}")
    return [verify_cache(target)]


def verify_cache(path: Path) -> Verification:
    """Every check of one cache file (stops after the header when the file cannot be opened)."""
    result = Verification(Path(path), "cache")
    handle = None

    def header() -> str:
        nonlocal handle
        handle = open_cache(path)
        names = present_datasets(json.loads(handle.attrs["manifest"]))
        return f"complete, format {handle.attrs['format_version']}, manifest and {len(names)} datasets present"

    if not result.run("header", header):
        return result
    with handle:
        manifest = json.loads(handle.attrs["manifest"])
        split = np.zeros(0, np.uint8)

        def split_column() -> str:
            nonlocal split
            split = read_checked(handle, "split")
            return f"{len(split)} rows, SHA-256 ok"

        if manifest.get("shards"):
            result.run("shards", lambda: _shards(Path(path), manifest))
        if result.run("sha256 /split", split_column):
            for name in present_datasets(manifest):
                if name != "split":
                    result.run(f"sha256 /{name}", lambda name=name: _dataset(handle, name, split))
            result.run("rows and files", lambda: _rows_and_files(handle, manifest, split))
        result.run("split registry", lambda: _registry(Path(path).parent, handle, manifest))
    return result


def _shards(path: Path, manifest: dict) -> str:
    """Each shard file the master maps, read whole against the SHA-256s sealed in it (dead rows included)."""
    rows = 0
    for entry in manifest["shards"]:
        rows += check_shard(path.parent / entry["file"], manifest["fingerprint"])["rows"]
    return f"{len(manifest['shards'])} shard files of {rows} rows, each whole and matching its SHA-256"


def _dataset(handle, name: str, split: np.ndarray) -> str:
    check_dataset(handle, name, split)
    shape = tuple(handle[name].shape)
    return f"{shape} {handle[name].dtype}, values in range, SHA-256 ok"


def _rows_and_files(handle, manifest: dict, split: np.ndarray) -> str:
    """Each file's rows carry its label and split, one original per file, counts as in the manifest."""
    source, copy = read_checked(handle, "source_index", split), read_checked(handle, "copy_index", split)
    labels = read_checked(handle, "labels", split)
    file_label, file_split = read_checked(handle, "files/label"), read_checked(handle, "files/split")
    problems = []
    if (labels != file_label[source]).any() or (split != file_split[source]).any():
        problems.append("rows whose label or split differs from their file's")
    if "targets" in manifest["datasets"]:  # multi-label: every copy of a file carries its original's targets
        targets = read_checked(handle, "targets", split)
        original = np.full(len(file_label), -1)
        original[source[copy == 0]] = np.flatnonzero(copy == 0)
        if not np.array_equal(targets, targets[original[source]], equal_nan=True):
            problems.append("rows whose targets differ from their file's original row")
    originals = np.bincount(source[copy == 0], minlength=len(file_label))
    if (originals != 1).any():
        problems.append(f"{int((originals != 1).sum())} files without exactly one original row")
    counts = manifest.get("counts", {})
    found = {name: int(((split == code) & (copy == 0)).sum()) for code, name in enumerate(SPLITS)}
    found.update(rows=len(split), train_copies=int((copy > 0).sum()))
    wrong = {key: (counts[key], value) for key, value in found.items() if key in counts and counts[key] != value}
    if wrong:
        problems.append(f"counts differ from the manifest (manifest, file): {wrong}")
    if problems:
        raise DamagedFileError(f"Cache {handle.filename} is inconsistent: {'; '.join(problems)}. Delete it and re-run "
                               f"'featcache extract'. Received: file={handle.filename!r}")
    return f"{len(split)} rows of {len(file_label)} files, counts as in the manifest"


def _registry(cache_dir: Path, handle, manifest: dict) -> str:
    """The split registry of the cache's seed is valid and assigns each train/val patient as the cache does."""
    if "seed" not in manifest or not (cache_dir / f"split-seed{manifest['seed']}.json").exists():
        return "no split registry beside the cache (nothing to compare)"
    registry = read_split_registry(cache_dir, manifest["seed"])
    patients = read_checked(handle, "files/patient")
    file_split = read_checked(handle, "files/split")
    moved = [(p, SPLITS[s], registry[p]) for p, s in zip(patients, file_split)
             if s != SPLITS.index("test") and p in registry and registry[p] != SPLITS[s]]
    if moved:
        patient, cached, listed = moved[0]
        raise DamagedFileError(f"split-seed{manifest['seed']}.json assigns {len(moved)} patients differently from "
                               f"{Path(handle.filename).name} (e.g. {patient!r}: {listed!r}, cache {cached!r}); it was "
                               f"edited. Restore it, or move it away and re-run 'featcache extract'. "
                               f"Received: patient={patient!r}")
    return f"{len(registry)} patients, all as in the cache"


def verify_export(folder: Path) -> Verification:
    """Every check of one export folder."""
    folder = Path(folder)
    result = Verification(folder, "export")
    card, model, serving = {}, None, None

    def model_json() -> str:
        card.update(read_card(folder, FIX_EXPORT))
        return f"featcache's, unedited (card_sha256 ok), {card['backbone']}, threshold {card['threshold']:.4f}"

    def keras_file() -> str:
        nonlocal model
        loaded = load_keras_checked(folder / KERAS_FILE, card["files"]["keras_sha256"], folder / CARD_FILE, FIX_EXPORT)
        detail = _check_keras_io(loaded, card, folder)
        model = loaded  # only a model with the promised input and output is compared with the SavedModel
        return detail

    def saved_model() -> str:
        nonlocal serving
        serving = _load_saved_model(folder)
        return f"loads, signatures {SIGNATURE} and {THRESHOLD_SIGNATURE}"

    def contents() -> str:
        check_export_folder(folder, FIX_EXPORT)
        return "only what an export writes; model.keras SHA-256 matches model.json"

    def model_card_text() -> str:
        if not (folder / MODEL_CARD_FILE).is_file():
            return "absent (an export of an older featcache)"
        if (folder / MODEL_CARD_FILE).read_text(errors="replace") != render_model_card(card):
            raise DamagedFileError(f"{folder / MODEL_CARD_FILE} no longer says what {CARD_FILE} says (edited after "
                                   f"export); {FIX_EXPORT} Received: model={str(folder)!r}")
        return f"rendered from {CARD_FILE}, unedited"

    if not result.run(CARD_FILE, model_json):
        return result
    result.run("contents", contents)
    result.run(MODEL_CARD_FILE, model_card_text)
    result.run(f"{KERAS_FILE} in safe mode", keras_file)
    if result.run(SAVED_MODEL_DIR, saved_model):
        result.run("threshold", lambda: _threshold(serving, card, folder))
        if model is not None:
            result.run("agreement", lambda: _agreement(model, serving, card, folder))
    return result


def _check_keras_io(model, card: dict, folder: Path) -> str:
    size = card["image_size"]
    try:
        found = (tuple(model.input_shape), str(model.input.dtype), tuple(model.output_shape))
    except (AttributeError, TypeError, ValueError):  # several inputs or outputs
        found = ("several inputs or outputs", "", "")
    outputs = len(card["class_names"]) if card.get("task") in ("multiclass", "multilabel") else 1  # one per class
    expected = ((None, size, size, 3), "uint8", (None, outputs))
    if found != expected:
        raise DamagedFileError(f"{folder / KERAS_FILE} takes {found[0]} {found[1]} and returns {found[2]}; model.json "
                               f"promises {expected}. {FIX_EXPORT} Received: model={str(folder)!r}")
    return f"loads; input {expected[0]} uint8, output {expected[2]}"


def _load_saved_model(folder: Path):
    import tensorflow as tf

    path = folder / SAVED_MODEL_DIR
    try:
        loaded = tf.saved_model.load(str(path))
        signatures = {name: loaded.signatures[name] for name in (SIGNATURE, THRESHOLD_SIGNATURE)}
    except Exception as exc:  # noqa: BLE001 - OSError, KeyError, protobuf DecodeError, ...
        raise DamagedFileError(f"TensorFlow cannot load {path} ({type(exc).__name__}: {first_line(exc)}); "
                               f"{FIX_EXPORT} Received: model={str(folder)!r}") from None
    return signatures


def _threshold(serving: dict, card: dict, folder: Path) -> str:
    out = serving[THRESHOLD_SIGNATURE]()
    saved = float(out["threshold"].numpy())
    if card.get("task") == "multilabel":  # a threshold per label
        found = out["thresholds"].numpy().tolist() if "thresholds" in out else None
        if found != [float(t) for t in card["thresholds"]]:
            raise DamagedFileError(f"The SavedModel in {folder} labels at thresholds {found}, model.json says "
                                   f"{card['thresholds']}. {FIX_EXPORT} Received: thresholds={card['thresholds']}")
        return f"SavedModel and model.json both {', '.join(f'{t:.4g}' for t in found)} (per label)"
    if saved != float(card["threshold"]):
        raise DamagedFileError(f"The SavedModel in {folder} labels at threshold {saved}, model.json says "
                               f"{card['threshold']}. {FIX_EXPORT} Received: threshold={card['threshold']}")
    return f"SavedModel and model.json both {saved:.6g}"


def _agreement(model, serving: dict, card: dict, folder: Path) -> str:
    """model.keras and the SavedModel give the same probabilities, and the SavedModel's labels are those of
    model.json's threshold, on two synthetic images (a gray PNG and a colour JPEG)."""
    import tensorflow as tf

    from featcache.assemble import predict_images
    from featcache.decode import decode_bytes, scaled_decode
    from featcache.export import synthetic_images

    encoded = synthetic_images(card["image_size"])
    scaled = scaled_decode(card["preprocessing"].get("decode_and_resize"))
    images = np.stack([decode_bytes(data, card["image_size"], name=name, scaled=scaled) for name, data in encoded])
    expected = predict_images(model, images)
    out = serving[SIGNATURE](image_bytes=tf.constant([data for _, data in encoded]))
    served, labels = out["probability"].numpy(), [b.decode() for b in out["label"].numpy()]
    diff = float(np.max(np.abs(served - expected)))
    if card.get("task") == "multilabel":  # the labels at or above their thresholds, comma-separated
        wanted = [",".join(n for n, q, t in zip(card["class_names"], p, card["thresholds"]) if q >= t) for p in served]
    else:
        wanted = [card["class_names"][int(np.argmax(p)) if np.ndim(p) else int(p >= card["threshold"])]
                  for p in served]  # a multi-class export (a probability per class) labels by argmax
    if diff > AGREEMENT_TOLERANCE or labels != wanted:
        raise DamagedFileError(f"model.keras and the SavedModel in {folder} disagree (max difference {diff:.3g}, "
                               f"labels {labels} vs {wanted}). {FIX_EXPORT} Received: max_abs_diff={diff:.3g}")
    return f"model.keras and SavedModel agree within {AGREEMENT_TOLERANCE:g} (max {diff:.2g}) on 2 synthetic images"


def format_verification(results: list[Verification]) -> str:
    """One line per check, then the verdict."""
    lines = []
    for result in results:
        lines.append(f"{result.kind} {result.target}")
        lines += [f"  {'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}" for c in result.checks]
    failed = sum(not c.ok for r in results for c in r.checks)
    total = sum(len(r.checks) for r in results)
    ok = all(r.ok for r in results)
    lines.append(f"verdict: {'OK' if ok else 'FAILED'}: {total - failed} of {total} checks passed")
    return "\n".join(lines)
