import hashlib
import re

import h5py
import numpy as np
import pytest
from conftest import corrupt_chunks

from featcache.cache import (
    FORMAT_VERSION,
    CachePaths,
    compute_fingerprint,
    find_cache,
    list_caches,
    load_pooled,
    open_cache,
    read_manifest,
    read_rows,
)
from featcache.cachewrite import (
    CacheLock,
    CacheWriter,
    FileTable,
    chunk_rows,
)
from featcache.checksums import DATASETS, CheckedRows, read_checked
from featcache.errors import CacheLockedError, CacheMismatchError, DamagedFileError, FeatcacheError, IncompleteCacheError
from featcache.partial import BatchStore


def _table(n):
    return FileTable(path=[f"train/A/{i}.png" for i in range(n)], sha256=["0" * 64] * n,
                     label=np.zeros(n), split=np.zeros(n), patient=[str(i) for i in range(n)])


def _write(path, n=5, commit=True):
    writer = CacheWriter(path, _table(n), n, (2, 2, 3))
    features = np.arange(n * 12, dtype=np.float32).reshape(n, 2, 2, 3)
    writer.write_rows(0, features, features.mean(axis=(1, 2)), labels=np.zeros(n), split=np.zeros(n),
                      source_index=np.arange(n), copy_index=np.zeros(n))
    if commit:
        writer.commit({"fingerprint": "f" * 64, "backbone": "tiny", "class_names": ["A", "B"]})
    return writer


def test_committed_cache_reads_back(tmp_path):
    path = tmp_path / "tiny-ffffffffffff.h5"
    _write(path)
    assert read_manifest(path)["backbone"] == "tiny"
    data = load_pooled(path)
    assert data.pooled.shape == (5, 3) and data.pooled.dtype == np.float32
    with open_cache(path) as handle:
        assert handle["features"].dtype == np.float16
        assert handle.attrs["format_version"] == FORMAT_VERSION
        assert handle["files/path"].asstr()[0] == "train/A/0.png"
    assert find_cache(tmp_path, "tiny") == path


def test_uncommitted_writer_leaves_no_cache(tmp_path):
    path = tmp_path / "tiny-ffffffffffff.h5"
    writer = _write(path, commit=False)
    assert not path.exists() and list_caches(tmp_path) == []
    with pytest.raises(IncompleteCacheError):
        open_cache(writer.tmp_path)
    writer.abort()
    assert not writer.tmp_path.exists()


def test_incomplete_and_foreign_files_are_refused(tmp_path):
    (tmp_path / "tiny-aaaaaaaaaaaa.partial").mkdir()
    with pytest.raises(IncompleteCacheError, match="incomplete"):
        find_cache(tmp_path, "tiny")
    with pytest.raises(FeatcacheError, match="run 'featcache extract --backbone vgg16'"):
        find_cache(tmp_path, "vgg16")
    other = tmp_path / "old.h5"
    with h5py.File(other, "w") as handle:
        handle.attrs.update(complete=True, format_version=FORMAT_VERSION + 1, manifest="{}")
    with pytest.raises(CacheMismatchError, match="format version"):
        open_cache(other)
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(CacheMismatchError, match="not a readable HDF5"):
        open_cache(tmp_path / "junk.h5")


def test_several_caches_for_one_backbone_must_be_chosen(tmp_path):
    _write(tmp_path / "tiny-aaaaaaaaaaaa.h5")
    _write(tmp_path / "tiny-bbbbbbbbbbbb.h5")
    with pytest.raises(FeatcacheError, match="--cache FILE"):
        find_cache(tmp_path, "tiny")


def test_fingerprint_changes_with_every_setting():
    base = {"backbone": "vgg16", "image_size": 224, "seed": 0}
    prints = {compute_fingerprint(base)}
    for key, value in (("backbone", "resnet152"), ("image_size", 128), ("seed", 1)):
        prints.add(compute_fingerprint({**base, key: value}))
    assert len(prints) == 4
    assert compute_fingerprint(dict(reversed(base.items()))) == compute_fingerprint(base)
    assert CachePaths.for_fingerprint("c", "vgg16", "ab" * 32).final.name == "vgg16-abababababab.h5"


def test_lock_refuses_a_second_writer(tmp_path):
    with CacheLock(tmp_path / ".tiny.lock"):
        with pytest.raises(CacheLockedError, match="Another featcache process"):
            with CacheLock(tmp_path / ".tiny.lock"):
                pass
    with CacheLock(tmp_path / ".tiny.lock"):  # released on exit
        pass


def test_batch_store_round_trip(tmp_path):
    store = BatchStore(tmp_path / "x.partial")
    store.write("b1", np.ones((2, 1, 1, 3), np.float16), np.ones((2, 3), np.float32), ["a", "b"],
                ["1" * 64, "2" * 64], np.array([0, 1]))
    (store.folder / ".b2.tmp.npz").write_bytes(b"half a batch")  # what a kill mid-write leaves
    index = store.index()
    assert index == {("a", "1" * 64, 0): (store.folder / "b1.npz", 0), ("b", "2" * 64, 1): (store.folder / "b1.npz", 1)}


def test_read_rows_and_chunking(tmp_path):
    with h5py.File(tmp_path / "r.h5", "w") as handle:
        ds = handle.create_dataset("x", data=np.arange(20))
        assert read_rows(ds, np.array([1, 2, 3, 7, 9, 10])).tolist() == [1, 2, 3, 7, 9, 10]
        assert read_rows(ds, np.array([], int)).shape == (0,)
    assert chunk_rows((7, 7, 2048), "float16") == 5
    assert chunk_rows((7, 7, 512), "float16") == 20


def test_batch_cut_short_is_ignored_and_recomputed(tmp_path):
    store = BatchStore(tmp_path / "x.partial")
    store.folder.mkdir(parents=True)
    (store.folder / "b0.npz").write_bytes(b"")  # renamed before its data reached the disk (power loss)
    (store.folder / "b1.npz").write_bytes(b"PK\x03\x04 torn")
    assert store.index() == {}


# --- integrity: checksums recorded while writing, checked while reading --------------------------


def _edit(path, name, change):
    """Rewrite a dataset through h5py: valid HDF5 (fletcher32 recomputed), only the values differ.
    ``change(values, row)`` edits in place; ``row`` is the first train row."""
    with h5py.File(path, "r+") as handle:
        values, row = handle[name][...], int(np.flatnonzero(handle["split"][...] == 0)[0])
        change(values, row)
        handle[name][...] = values


def test_checksums_are_recorded_per_split_and_chunks_carry_fletcher32(synthetic_cache):
    path = synthetic_cache()
    records = read_manifest(path)["datasets"]
    assert set(records) == set(DATASETS)
    assert set(records["pooled"]["sha256"]) == {"train", "val", "test"} and set(records["split"]["sha256"]) == {"all"}
    with h5py.File(path, "r") as handle:
        split, labels = handle["split"][...], handle["labels"][...]
        train = np.ascontiguousarray(handle["pooled"][...][split == 0])
        assert all(handle[name].fletcher32 for name in ("features", "pooled", "labels", "split", "source_index"))
        assert records["features"]["shape"] == list(handle["features"].shape)
    rows = b"".join(hashlib.sha256(row.tobytes()).digest()[:16] for row in train)  # the "rows" scheme
    assert records["pooled"]["scheme"] == "rows"
    assert records["pooled"]["sha256"]["train"] == hashlib.sha256(rows).hexdigest()
    assert "scheme" not in records["labels"] and records["labels"]["sha256"]["train"] == hashlib.sha256(
        np.ascontiguousarray(labels[split == 0]).astype("<i2").tobytes()).hexdigest()


@pytest.mark.parametrize("name, change, message", [
    ("pooled", lambda v, r: v.__imul__(1000), "/pooled (train rows) does not match the SHA-256"),
    ("pooled", lambda v, r: v.__setitem__((r, 0), np.nan), "/pooled holds 1 NaN or infinite values"),
    ("pooled", lambda v, r: v.__setitem__((r, 1), np.inf), "/pooled holds 1 NaN or infinite values"),
    ("labels", lambda v, r: v.__setitem__(r, 5), "/labels holds 1 values outside 0..1"),
    ("labels", lambda v, r: v.__setitem__(r, 1 - v[r]), "/labels (train rows) does not match"),
    ("source_index", lambda v, r: v.__setitem__(r, 10_000), "/source_index holds 1 values outside"),
    ("split", lambda v, r: v.__setitem__(r, 7), "/split holds 1 values outside 0..2"),
    ("split", lambda v, r: v.__setitem__(r, 2), "/split does not match"),  # a train row moved into test
    ("copy_index", lambda v, r: v.__setitem__(r, -1), "/copy_index holds 1 values outside"),
])
def test_edited_arrays_in_valid_hdf5_are_refused(synthetic_cache, name, change, message):
    path = synthetic_cache()
    _edit(path, name, change)
    with pytest.raises(DamagedFileError, match=re.escape(message)) as error:
        load_pooled(path, ("train", "val"))
    assert str(path) in str(error.value) and "re-run 'featcache extract'" in str(error.value)


def test_only_the_splits_read_are_checked(synthetic_cache):
    path = synthetic_cache()
    with h5py.File(path, "r") as handle:
        test_rows = np.flatnonzero(handle["split"][...] == 2)
    _edit(path, "pooled", lambda v, _: v.__setitem__(test_rows, v[test_rows] * 1000))
    assert len(load_pooled(path, ("train", "val")).pooled)  # train-head never reads test rows...
    with pytest.raises(DamagedFileError, match=re.escape("/pooled (test rows) does not match")):
        load_pooled(path)  # ...but whoever reads them notices


def _stream(path, name, block):
    """Every test row of ``name`` through CheckedRows, ``block`` rows at a time, then finish()."""
    with open_cache(path) as handle:
        rows = CheckedRows(handle, name, read_checked(handle, "split"), ("test",))
        parts = [rows.read(block) for _ in range(0, len(rows.rows), block)]
        rows.finish()
        return np.concatenate(parts)


def test_rows_read_in_blocks_are_checked_as_a_whole(synthetic_cache):
    path = synthetic_cache(n_test=23)
    with open_cache(path) as handle:
        whole = read_checked(handle, "features", read_checked(handle, "split"), ("test",))
    for block in (1, 5, 23, 64):
        np.testing.assert_array_equal(_stream(path, "features", block), whole)
    with open_cache(path) as handle:
        rows = CheckedRows(handle, "features", read_checked(handle, "split"), ("test",))
        rows.read(5)
        with pytest.raises(ValueError, match="5 of 23 rows read before finish"):
            rows.finish()  # a digest of some rows proves nothing
    with h5py.File(path, "r") as handle:
        last = int(np.flatnonzero(handle["split"][...] == 2)[-1])
    _edit(path, "features", lambda v, _: v.__setitem__((last, 0, 0, 0), v[last, 0, 0, 0] + 1))  # the very last row
    with pytest.raises(DamagedFileError, match=re.escape("/features (test rows) does not match the SHA-256")):
        _stream(path, "features", 5)


def test_rotten_chunks_fail_their_fletcher32_check(synthetic_cache):
    path = synthetic_cache()
    assert corrupt_chunks(path, "pooled") >= 1
    with pytest.raises(DamagedFileError, match="/pooled cannot be read"):
        load_pooled(path)


@pytest.mark.parametrize("damage, error, message", [
    (lambda f: f.attrs.__setitem__("manifest", "{not json"), DamagedFileError, "is not valid JSON"),
    (lambda f: f.attrs.__setitem__("manifest", "[1, 2]"), DamagedFileError, "holds a JSON list, not an object"),
    (lambda f: f.attrs.__setitem__("manifest", '{"backbone": "tiny"}'), DamagedFileError, "'fingerprint' is missing"),
    (lambda f: f.__delitem__("labels"), DamagedFileError, "dataset /labels is missing"),
    (lambda f: f.__delitem__("files/path"), DamagedFileError, "dataset /files/path is missing"),
    (lambda f: f.attrs.__setitem__("format_version", 1), CacheMismatchError, "format version 1"),
    (lambda f: f.attrs.__setitem__("manifest", f.attrs["manifest"].replace('"NORMAL", "PNEUMONIA"',
                                                                          '"PNEUMONIA", "NORMAL"')),
     DamagedFileError, "its manifest was edited"),  # valid JSON, every field there: classes swapped
])
def test_damaged_metadata_is_one_line(synthetic_cache, damage, error, message):
    path = synthetic_cache()
    with h5py.File(path, "r+") as handle:
        damage(handle)
    with pytest.raises(error, match=re.escape(message)) as raised:
        open_cache(path)
    assert "\n" not in str(raised.value) and str(path) in str(raised.value) and "Received:" in str(raised.value)


def test_flipped_bytes_anywhere_in_the_metadata_give_featcache_errors(synthetic_cache, tmp_path):
    """Every damaged byte in the first 8 KiB (superblock, object headers, B-trees, heaps) is either harmless
    or a one-line FeatcacheError: never an h5py exception or a crash."""
    original = synthetic_cache().read_bytes()
    damaged, outcomes = tmp_path / "damaged.h5", set()
    for offset in range(0, 8192, 41):
        data = bytearray(original)
        data[offset:offset + 3] = bytes(255 - b for b in data[offset:offset + 3])
        damaged.write_bytes(bytes(data))
        try:
            load_pooled(damaged)
            outcomes.add("ok")
        except FeatcacheError as exc:
            assert "\n" not in str(exc)
            outcomes.add(type(exc).__name__)
    assert {"DamagedFileError", "CacheMismatchError"} <= outcomes


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_fletcher32_works_with_compression(tmp_path, compression):
    """fletcher32 runs after the compression filter: it checks the stored (compressed) bytes."""
    path = tmp_path / "tiny-ffffffffffff.h5"
    writer = CacheWriter(path, _table(6), 6, (2, 2, 3), compression=compression)
    features = np.random.default_rng(0).random((6, 2, 2, 3)).astype(np.float32)
    writer.write_rows(0, features, features.mean(axis=(1, 2)), labels=np.zeros(6), split=np.zeros(6),
                      source_index=np.arange(6), copy_index=np.zeros(6))
    writer.commit({"fingerprint": "f" * 64, "backbone": "tiny", "class_names": ["A", "B"]})
    with open_cache(path) as handle:
        assert handle["features"].compression == compression and handle["features"].fletcher32
    np.testing.assert_array_equal(load_pooled(path).pooled, features.mean(axis=(1, 2)))
    corrupt_chunks(path, "pooled")
    with pytest.raises(DamagedFileError, match="/pooled cannot be read"):
        load_pooled(path)


def test_a_cache_file_that_cannot_be_created_is_one_storage_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from featcache.cachewrite import atomic_h5
    from featcache.errors import StorageError

    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    for make in (lambda: CacheWriter(blocker / "tiny-ffffffffffff.h5", _table(3), 3, (2, 2, 3)),
                 lambda: atomic_h5(blocker / "shard.h5").__enter__()):
        with pytest.raises(StorageError, match=r"^Cannot .*a-file.*Received: (ENOTDIR|EEXIST)$"):
            make()

    def no_space(self, name, *args, **kwargs):  # the disk fills while the per-file table is written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Group, "create_group", no_space)
    path = tmp_path / "tiny-ffffffffffff.h5"
    with pytest.raises(StorageError, match=r"^Cannot write .*tiny-ffffffffffff\.h5\.incomplete: .*Received: ENOSPC$"):
        CacheWriter(path, _table(3), 3, (2, 2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
