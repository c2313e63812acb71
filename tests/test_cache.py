import h5py
import numpy as np
import pytest

from featcache.cache import (
    FORMAT_VERSION,
    CacheLock,
    CachePaths,
    CacheWriter,
    FileTable,
    chunk_rows,
    compute_fingerprint,
    find_cache,
    list_caches,
    load_pooled,
    open_cache,
    read_manifest,
    read_rows,
)
from featcache.errors import CacheLockedError, CacheMismatchError, FeatcacheError, IncompleteCacheError
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
        writer.commit({"fingerprint": "f" * 64, "backbone": "tiny"})
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
