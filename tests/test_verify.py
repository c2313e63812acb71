"""``featcache verify`` and the integrity checks of every stage: tampered or rotten caches, split registries,
heads and exports are caught by verify or by the stage that reads them, always as one line (exit 1)."""

import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest
from conftest import corrupt_chunks
from pipeline import FAST, copy_run, dev_pipeline, run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory, dev_data):
    return dev_pipeline(tmp_path_factory, dev_data)


@pytest.fixture
def copy(run, tmp_path):
    return copy_run(run, tmp_path)


def _one_line_error(result, message):
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def _verify(target):
    """(exit code, {check name: (ok, detail)}, verdict line) of 'featcache verify TARGET'."""
    result = run_cli("verify", target)
    assert "Traceback" not in result.output, result.output
    lines = result.stdout.strip().splitlines()
    checks = {}
    for line in lines[1:-1]:
        status, rest = line.strip().split(maxsplit=1)
        name, detail = rest.split(": ", 1)
        checks[name] = (status == "ok", detail)
    return result.exit_code, checks, lines[-1]


def _edit(path, name, change):
    """Change a dataset's values through h5py: the file stays valid HDF5 (fletcher32 recomputed).
    ``change(values, row)`` returns the new values; ``row`` is the first train row (train-head reads it)."""
    with h5py.File(path, "r+") as handle:
        values, row = handle[name][...], int(np.flatnonzero(handle["split"][...] == 0)[0])
        handle[name][...] = change(values, row)


def _at(row, values, value):
    values = values.copy()
    values[row] = value
    return values


# --- verify on untouched files -------------------------------------------------------------------


def test_an_untouched_cache_and_export_pass_every_check(run):
    code, checks, verdict = _verify(run["cache"])
    assert code == 0 and verdict.startswith("verdict: OK"), checks
    assert {"header", "sha256 /features", "sha256 /pooled", "sha256 /files/path", "rows and files",
            "split registry"} <= set(checks)
    assert all(ok for ok, _ in checks.values())
    code, checks, verdict = _verify(run["model"])
    assert code == 0 and verdict.startswith("verdict: OK"), checks
    assert {"model.json", "contents", "MODEL_CARD.md", "model.keras in safe mode", "model.export", "threshold",
            "agreement"} == set(checks)


def test_a_folder_of_caches_is_verified_cache_by_cache(run):
    result = run_cli("verify", run["cache_dir"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\ncache ") + result.stdout.startswith("cache ") == 1


def test_nothing_to_verify_is_one_line(tmp_path):
    _one_line_error(run_cli("verify", tmp_path), "holds neither a featcache export")
    _one_line_error(run_cli("verify", tmp_path / "missing.h5"), "does not exist")


# --- tampered cache arrays ------------------------------------------------------------------------


def test_pooled_times_1000_is_caught_by_verify_and_train_head(copy):
    _edit(copy["cache"], "pooled", lambda v, _: v * 1000)
    code, checks, verdict = _verify(copy["cache"])
    assert code == 1 and verdict.startswith("verdict: FAILED")
    assert not checks["sha256 /pooled"][0] and "does not match the SHA-256" in checks["sha256 /pooled"][1]
    assert checks["sha256 /features"][0]  # one line per check: the others still pass
    head = (copy["run_dir"] / "head.json").read_bytes()
    _one_line_error(run_cli("train-head", "--cache-dir", copy["cache_dir"], "--trials", "1", "--no-progress"),
                    "/pooled (train rows) does not match the SHA-256")
    assert (copy["run_dir"] / "head.json").read_bytes() == head  # nothing trained on garbage, nothing written


def test_extract_does_not_launder_rows_of_a_tampered_cache(copy, tmp_path):
    """Re-running extract reuses an older cache's rows without reading their maps (that would cost a read of the
    whole cache on every run); an edited row must still never be laundered into a new file with fresh, valid
    checksums: the new master's checksums are the row digests stored when the rows were computed."""
    with h5py.File(copy["cache"], "r") as handle:
        test_rows = handle["split"][...] == 2
    _edit(copy["cache"], "pooled", lambda v, _: np.where(test_rows[:, None], v * 1000, v))
    before = copy["cache"].read_bytes()
    data = tmp_path / "data"
    shutil.copytree(copy["data"], data)
    extra = sorted((data / "train" / "NORMAL").iterdir())[0]
    shutil.copyfile(extra, extra.with_name(f"added-{extra.name}"))
    result = run_cli("extract", "--data", data, "--cache-dir", copy["cache_dir"], *FAST)
    assert result.exit_code == 0, result.output
    assert copy["cache"].read_bytes() != before, "a new master, over the same (edited) shards"
    code, checks, _ = _verify(copy["cache"])
    assert code == 1 and not checks["sha256 /pooled"][0] and checks["sha256 /features"][0]
    _one_line_error(run_cli("evaluate", "--no-progress", "--cache-dir", copy["cache_dir"], "--bootstrap", "10"),
                    "/pooled (test rows) does not match the SHA-256")


def test_rows_that_do_not_fit_their_files_fail_verify(tmp_path):
    """Checksums cannot tell a cache that was written wrong; verify also checks rows against files and counts."""
    from featcache.cachewrite import CacheWriter, FileTable

    table = FileTable(path=["test/A/0.png", "train/A/1.png", "train/B/2.png"], sha256=["0" * 64] * 3,
                      label=np.array([0, 0, 1]), split=np.array([2, 0, 0]), patient=["p0", "p1", "p2"])
    writer = CacheWriter(tmp_path / "tiny-ffffffffffff.h5", table, 3, (1, 1, 2))
    features = np.ones((3, 1, 1, 2), np.float32)
    writer.write_rows(0, features, features.mean(axis=(1, 2)), labels=np.array([0, 1, 0]),
                      split=np.array([2, 0, 0]), source_index=np.array([0, 1, 1]), copy_index=np.zeros(3))
    path = writer.commit({"fingerprint": "f" * 64, "backbone": "tiny", "class_names": ["A", "B"],
                          "counts": {"train": 2, "val": 0, "test": 1, "train_copies": 0, "rows": 4}})
    code, checks, _ = _verify(path)
    assert code == 1 and checks["sha256 /pooled"][0]  # the digests hold: the file is as written
    assert not checks["rows and files"][0]
    for problem in ("label or split differs from their file's", "2 files without exactly one original row",
                    "counts differ from the manifest"):
        assert problem in checks["rows and files"][1]


def test_rotten_feature_chunks_are_caught_by_verify_and_evaluate(copy):
    corrupt_chunks(copy["cache"], "features")
    code, checks, _ = _verify(copy["cache"])
    assert code == 1 and not checks["sha256 /features"][0] and "cannot be read" in checks["sha256 /features"][1]
    _one_line_error(run_cli("evaluate", "--no-progress", "--cache-dir", copy["cache_dir"], "--bootstrap", "10"),
                    "/features cannot be read")


@pytest.mark.parametrize("name, change, message", [
    ("labels", lambda v, r: _at(r, v, 9), "/labels holds 1 values outside 0..1"),
    ("source_index", lambda v, r: _at(r, v, 100_000), "/source_index holds 1 values outside"),
    ("split", lambda v, r: np.where(v == 0, 2, v), "/split does not match"),  # every train row moved into test
    ("pooled", lambda v, r: _at(r, v, np.nan), "NaN or infinite"),
])
def test_out_of_range_or_moved_rows_are_one_line_in_every_stage(copy, name, change, message):
    _edit(copy["cache"], name, change)
    code, checks, _ = _verify(copy["cache"])
    assert code == 1 and any(message in detail for ok, detail in checks.values() if not ok), checks
    _one_line_error(run_cli("train-head", "--cache-dir", copy["cache_dir"], "--trials", "1", "--no-progress"),
                    "is damaged")


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.attrs.__setitem__("manifest", "{not json"), "is not valid JSON"),
    (lambda f: f.__delitem__("pooled"), "dataset /pooled is missing"),
    (lambda f: f.attrs.__setitem__("format_version", 1), "format version 1"),
])
def test_damaged_cache_metadata_is_one_line_in_every_stage(copy, damage, message):
    with h5py.File(copy["cache"], "r+") as handle:
        damage(handle)
    for args in (["info", copy["cache"]],
                 ["train-head", "--cache", copy["cache"], "--trials", "1", "--no-progress"],
                 ["evaluate", "--no-progress", "--cache-dir", copy["cache_dir"], "--bootstrap", "10"],
                 ["export", "--cache-dir", copy["cache_dir"], "--out", copy["cache_dir"].parent / "new"]):
        _one_line_error(run_cli(*args), message)
    code, checks, verdict = _verify(copy["cache"])
    assert code == 1 and message in checks["header"][1] and verdict.startswith("verdict: FAILED")


def test_damaged_superblock_bytes_are_one_line(copy):
    data = bytearray(copy["cache"].read_bytes())
    data[0:8] = b"\x00" * 8  # the HDF5 signature
    copy["cache"].write_bytes(bytes(data))
    _one_line_error(run_cli("info", copy["cache"]), "is not a readable HDF5 cache")
    _one_line_error(run_cli("train-head", "--cache", copy["cache"], "--trials", "1", "--no-progress"),
                    "is not a readable HDF5 cache")


# --- the split registry ---------------------------------------------------------------------------


def _registry(cache_dir):
    return cache_dir / "split-seed0.json"


def test_a_train_patient_edited_to_test_stops_extract_and_fails_verify(copy):
    path = _registry(copy["cache_dir"])
    registry = json.loads(path.read_text())
    patient = next(p for p, split in sorted(registry["patients"].items()) if split == "train")
    registry["patients"][patient] = "test"
    path.write_text(json.dumps(registry))
    _one_line_error(run_cli("extract", "--data", copy["data"], "--cache-dir", copy["cache_dir"], *FAST),
                    f"patient {patient!r} is assigned 'test'")
    code, checks, _ = _verify(copy["cache"])
    assert code == 1 and not checks["split registry"][0] and "'test'" in checks["split registry"][1]


def test_a_registry_that_disagrees_with_the_cache_fails_verify(copy):
    path = _registry(copy["cache_dir"])
    registry = json.loads(path.read_text())
    patient = next(p for p, split in sorted(registry["patients"].items()) if split == "train")
    registry["patients"][patient] = "val"  # a valid value, but not the split the cache was built with
    path.write_text(json.dumps(registry))
    code, checks, _ = _verify(copy["cache"])
    assert code == 1 and not checks["split registry"][0] and patient in checks["split registry"][1]


# --- heads and run records ------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("{not json", "head.json is not valid JSON"),
    ('{"backbone": "tiny"}', "'cache_file' is missing"),
    (None, "'threshold' is str"),
    ("path", "not a file name in its folder"),
])
def test_malformed_head_json_is_one_line(copy, text, message):
    path = copy["run_dir"] / "head.json"
    if text in (None, "path"):
        record = json.loads(path.read_text())
        record.update({"threshold": "0.5"} if text is None else {"head_file": "../../../etc/passwd"})
        text = json.dumps(record)
    path.write_text(text)
    for args in (["evaluate", "--no-progress", "--cache-dir", copy["cache_dir"], "--bootstrap", "10"],
                 ["export", "--cache-dir", copy["cache_dir"], "--out", copy["cache_dir"].parent / "new"]):
        _one_line_error(run_cli(*args), message)


def test_a_head_keras_that_is_not_a_zip_is_one_line(copy):
    head = copy["run_dir"] / "head.keras"
    head.write_bytes(b"PK\x03\x04 but not really a zip")
    record = json.loads((copy["run_dir"] / "head.json").read_text())
    record["head_sha256"] = hashlib.sha256(head.read_bytes()).hexdigest()  # the record agrees: only Keras can tell
    (copy["run_dir"] / "head.json").write_text(json.dumps(record))
    _one_line_error(run_cli("evaluate", "--no-progress", "--cache-dir", copy["cache_dir"], "--bootstrap", "10"), "Keras cannot load")


def test_a_swapped_head_keras_is_refused(copy, tmp_path):
    shutil.copyfile(copy["model"] / "model.keras", copy["run_dir"] / "head.keras")
    _one_line_error(run_cli("evaluate", "--no-progress", "--cache-dir", copy["cache_dir"], "--bootstrap", "10"), "is not the head")


@pytest.mark.parametrize("text, message", [
    ("{not json", "selection.json is not valid JSON"),
    ('{"backbone": "tiny", "cache_file": "x.h5", "cache_fingerprint": "f"}', "'head_sha256' is missing"),
])
def test_malformed_selection_json_is_one_line(copy, text, message):
    (copy["cache_dir"] / "runs" / "selection.json").write_text(text)
    _one_line_error(run_cli("export", "--cache-dir", copy["cache_dir"], "--out", copy["cache_dir"].parent / "new"),
                    message)


# --- exports --------------------------------------------------------------------------------------


def test_an_edited_threshold_fails_verify_even_when_the_card_is_resealed(copy):
    from featcache.modelcard import seal_card

    path = copy["model"] / "model.json"
    card = json.loads(path.read_text())
    path.write_text(json.dumps({**card, "threshold": 0.01}))
    code, checks, _ = _verify(copy["model"])
    assert code == 1 and "was edited after export" in checks["model.json"][1]
    resealed = seal_card({k: v for k, v in card.items() if k != "card_sha256"} | {"threshold": 0.01})
    path.write_text(json.dumps(resealed))
    code, checks, _ = _verify(copy["model"])  # the card is self-consistent now, but the SavedModel knows better
    assert code == 1 and checks["model.json"][0] and not checks["threshold"][0]


def test_an_edited_model_card_text_fails_verify_and_an_absent_one_is_reported(copy):
    path = copy["model"] / "MODEL_CARD.md"
    path.write_text(path.read_text().replace("Not a medical device", "A medical device"))
    code, checks, _ = _verify(copy["model"])
    assert code == 1 and not checks["MODEL_CARD.md"][0] and "edited after export" in checks["MODEL_CARD.md"][1]
    assert checks["model.json"][0] and checks["contents"][0]
    path.unlink()  # an export of an older featcache has none: not an error
    code, checks, _ = _verify(copy["model"])
    assert code == 0 and "absent" in checks["MODEL_CARD.md"][1]


def test_a_swapped_model_keras_fails_verify(copy, tmp_path):
    keras_file = copy["model"] / "model.keras"
    keras_file.write_bytes(keras_file.read_bytes()[:-10])
    code, checks, _ = _verify(copy["model"])
    assert code == 1 and not checks["contents"][0] and not checks["model.keras in safe mode"][0]
    assert "SHA-256" in checks["model.keras in safe mode"][1]


def test_a_missing_saved_model_fails_verify(copy):
    shutil.rmtree(copy["model"] / "model.export")
    code, checks, _ = _verify(copy["model"])
    assert code == 1 and not checks["model.export"][0] and not checks["contents"][0]
