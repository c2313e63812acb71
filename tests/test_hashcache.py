"""The stat-keyed hash cache of ``extract``: reuse only on a whole-key match, never trust a bad file."""

import json
import logging
import os

import numpy as np
import pytest

import featcache.extract as extract
from featcache import hashcache
from featcache.data import find_images, hash_file
from featcache.extract import _hash_files, extract_features
from featcache.hashcache import HASHES_FILE, LEGACY_FILE
from featcache.hashfile import KEY_DTYPE, RootEntries, read_hash_file, write_hash_file


@pytest.fixture
def counted(monkeypatch):
    """Counts the files ``extract`` reads to hash; files are old enough to be remembered at once."""
    monkeypatch.setattr(hashcache, "RACY_SECONDS", 0.0)
    calls = []

    def counting(path):
        calls.append(os.path.basename(path))
        return hash_file(path)

    monkeypatch.setattr(extract, "hash_file", counting)
    return calls


def test_unchanged_files_are_not_read_again_and_results_match(small_xrays, tmp_path, counted):
    folder = find_images(small_xrays, seed=0)
    plain, _ = _hash_files(folder)
    assert len(counted) == len(folder.records)
    first, _ = _hash_files(folder, cache_dir=tmp_path)
    assert len(counted) == 2 * len(folder.records) and (tmp_path / HASHES_FILE).is_file()
    second, _ = _hash_files(folder, cache_dir=tmp_path)
    assert len(counted) == 2 * len(folder.records), "an unchanged file was hashed again"
    assert first == plain and second == plain


def test_a_rewritten_file_of_the_same_size_and_mtime_is_hashed_again(small_xrays, tmp_path, counted):
    folder = find_images(small_xrays, seed=0)
    before, _ = _hash_files(folder, cache_dir=tmp_path)
    target = small_xrays / folder.records[0].path
    info = os.stat(target)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))  # same size, same mtime: only ctime tells
    assert os.stat(target).st_size == info.st_size
    counted.clear()
    after, _ = _hash_files(folder, cache_dir=tmp_path)
    assert counted == [target.name]
    assert after[0].sha256 == hash_file(target) != before[0].sha256
    assert after[1:] == before[1:]


def test_recently_changed_files_are_not_remembered(small_xrays, tmp_path, counted, monkeypatch):
    monkeypatch.setattr(hashcache, "RACY_SECONDS", 3600.0)  # every file is "just written"
    folder = find_images(small_xrays, seed=0)
    _hash_files(folder, cache_dir=tmp_path)
    _hash_files(folder, cache_dir=tmp_path)
    assert len(counted) == 2 * len(folder.records)


def _valid_file(small_xrays, tmp_path) -> bytes:
    _hash_files(find_images(small_xrays, seed=0), cache_dir=tmp_path)
    return (tmp_path / HASHES_FILE).read_bytes()


@pytest.mark.parametrize("damage", ["not json", "json", "empty", "cut", "flipped", "appended", "other version"])
def test_a_damaged_or_foreign_hash_file_is_ignored_and_rebuilt(small_xrays, tmp_path, counted, damage, caplog):
    folder = find_images(small_xrays, seed=0)
    expected, _ = _hash_files(folder)
    valid = _valid_file(small_xrays, tmp_path / "valid")
    middle = len(valid) // 2
    content = {"not json": b"{not json", "json": b'{"format": "featcache-hashes", "version": 2, "roots": []}',
               "empty": b"", "cut": valid[:middle], "flipped": valid[:middle] + bytes([valid[middle] ^ 1]) +
               valid[middle + 1:], "appended": valid + b"\0", "other version": valid[:7] + b"\x03" + valid[8:]}[damage]
    (tmp_path / HASHES_FILE).write_bytes(content)
    counted.clear()
    with caplog.at_level(logging.INFO, logger="featcache.hashcache"):
        got, _ = _hash_files(folder, cache_dir=tmp_path)
    assert got == expected and len(counted) == len(folder.records)
    assert "ignoring the hash cache" in caplog.text
    assert len(read_hash_file(tmp_path / HASHES_FILE)[str(small_xrays.resolve())]) == len(folder.records)


def test_a_lying_entry_is_not_trusted_unless_its_whole_key_matches(small_xrays, tmp_path, counted):
    folder = find_images(small_xrays, seed=0)
    expected, _ = _hash_files(folder, cache_dir=tmp_path)
    (entries,) = read_hash_file(tmp_path / HASHES_FILE).values()
    keys, digests = entries.keys.copy(), entries.digests.copy()
    first = entries.paths.index(folder.records[0].path)
    keys[first]["ctime_ns"] += 1  # another ctime: the stored hash must not be used
    digests[first] = 0
    second = entries.paths.index(folder.records[1].path)
    keys[second]["inode"] += 1  # another file under the same name
    digests[second] = 0
    write_hash_file(tmp_path / HASHES_FILE, {str(small_xrays.resolve()): RootEntries(keys, digests, entries.paths)})
    counted.clear()
    got, _ = _hash_files(folder, cache_dir=tmp_path)
    assert got == expected and sorted(counted) == sorted(os.path.basename(r.path) for r in folder.records[:2])


def test_other_data_folders_entries_are_kept(small_xrays, tmp_path, counted):
    folder = find_images(small_xrays, seed=0)
    other = str(tmp_path / "other")
    kept = RootEntries(np.array([(1, 2, 3, 2**64 - 1, 5)], KEY_DTYPE), np.full((1, 32), 7, np.uint8), ["x.png"])
    write_hash_file(tmp_path / HASHES_FILE, {other: kept})
    _hash_files(folder, cache_dir=tmp_path)
    roots = read_hash_file(tmp_path / HASHES_FILE)
    assert len(roots) == 2 and roots[other].paths == ["x.png"]
    assert roots[other].keys.tolist() == kept.keys.tolist() and (roots[other].digests == 7).all()


def test_an_unchanged_folder_does_not_rewrite_the_hash_file(small_xrays, tmp_path, counted):
    folder = find_images(small_xrays, seed=0)
    _hash_files(folder, cache_dir=tmp_path)
    before = os.stat(tmp_path / HASHES_FILE)
    _hash_files(folder, cache_dir=tmp_path)
    after = os.stat(tmp_path / HASHES_FILE)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    (small_xrays / folder.records[3].path).unlink()  # a file gone: its entry is dropped
    _hash_files(folder, cache_dir=tmp_path)
    (entries,) = read_hash_file(tmp_path / HASHES_FILE).values()
    assert sorted(entries.paths) == sorted(r.path for i, r in enumerate(folder.records) if i != 3)


def _legacy_record(folder, files) -> dict:
    root = str(folder.root.resolve())
    return {"format": "featcache-hashes", "version": 1,
            "roots": {root: {f.record.path: [*hashcache.stat_key(folder.root / f.record.path), f.sha256]
                             for f in files}}}


def test_the_json_hash_file_of_earlier_versions_is_used_once_and_replaced(small_xrays, tmp_path, counted):
    folder = find_images(small_xrays, seed=0)
    expected, _ = _hash_files(folder)
    record = _legacy_record(folder, expected)
    entries = record["roots"][str(small_xrays.resolve())]
    entries[folder.records[0].path][2] += 1  # a changed ctime: hashed again
    entries[folder.records[1].path][5] = "short"  # malformed: hashed again
    entries[folder.records[2].path][5] = "g" * 64  # not hex: hashed again
    (tmp_path / LEGACY_FILE).write_text(json.dumps(record))
    counted.clear()
    got, _ = _hash_files(folder, cache_dir=tmp_path)
    assert got == expected and sorted(counted) == sorted(os.path.basename(r.path) for r in folder.records[:3])
    assert not (tmp_path / LEGACY_FILE).exists() and (tmp_path / HASHES_FILE).is_file()
    counted.clear()
    again, _ = _hash_files(folder, cache_dir=tmp_path)
    assert again == expected and counted == []


@pytest.mark.parametrize("content", [b"{not json", b'{"format": "other", "version": 1, "roots": {}}', b"[1, 2]",
                                     b"\xff\xfe"])
def test_a_damaged_json_hash_file_is_ignored(small_xrays, tmp_path, counted, content, caplog):
    folder = find_images(small_xrays, seed=0)
    expected, _ = _hash_files(folder)
    (tmp_path / LEGACY_FILE).write_bytes(content)
    counted.clear()
    with caplog.at_level(logging.INFO, logger="featcache.hashcache"):
        got, _ = _hash_files(folder, cache_dir=tmp_path)
    assert got == expected and len(counted) == len(folder.records)
    assert "ignoring the hash cache" in caplog.text and not (tmp_path / LEGACY_FILE).exists()


def test_stat_keys_out_of_the_file_range_are_never_remembered(small_xrays, tmp_path, counted, monkeypatch):
    folder = find_images(small_xrays, seed=0)
    expected, _ = _hash_files(folder)
    real = hashcache.stat_keys

    def huge_inode(prefix, paths):  # an inode beyond 64 bits for the first file
        keys = real(prefix, paths)
        keys[0] = (*keys[0][:3], 2**70, keys[0][4])
        return keys

    monkeypatch.setattr(extract, "stat_keys", huge_inode)
    for _ in range(2):
        counted.clear()
        got, _ = _hash_files(folder, cache_dir=tmp_path)
        assert got == expected
    assert counted == [os.path.basename(folder.records[0].path)]


def test_the_hash_file_round_trips(tmp_path):
    roots = {"/data/a": RootEntries(np.array([(0, -5, 2**63 - 1, 2**64 - 1, 0), (9, 9, 9, 9, 9)], KEY_DTYPE),
                                    np.arange(64, dtype=np.uint8).reshape(2, 32), ["train/N/é x.png", "b/\udcff.png"]),
             "/data/empty": RootEntries(np.empty(0, KEY_DTYPE), np.empty((0, 32), np.uint8), [])}
    write_hash_file(tmp_path / HASHES_FILE, roots)
    back = read_hash_file(tmp_path / HASHES_FILE)
    assert list(back) == list(roots)
    for root, entries in roots.items():
        assert back[root].paths == entries.paths and back[root].keys.tolist() == entries.keys.tolist()
        assert np.array_equal(back[root].digests, entries.digests)
    assert [p.name for p in tmp_path.iterdir()] == [HASHES_FILE], "no temporary left behind"


def test_failing_to_write_the_hash_file_is_not_an_error(small_xrays, tmp_path, counted, monkeypatch, caplog):
    folder = find_images(small_xrays, seed=0)
    expected, _ = _hash_files(folder)

    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(hashcache.os, "replace", refuse)
    with caplog.at_level(logging.DEBUG, logger="featcache.hashcache"):
        got, _ = _hash_files(folder, cache_dir=tmp_path)
    assert got == expected and "could not write the hash cache" in caplog.text
    assert os.listdir(tmp_path) == ["xrays"], "no hash file and no temporary left behind"


def test_extract_with_an_unusable_hash_file_gives_the_same_cache(small_xrays, extract_config, tmp_path, counted):
    (clean,) = extract_features(extract_config(small_xrays, cache_dir=tmp_path / "a", augment_copies=0))
    assert (tmp_path / "a" / HASHES_FILE).is_file()
    (tmp_path / "b" / HASHES_FILE).mkdir(parents=True)  # cannot be read nor replaced (a second writer's mess)
    (blocked,) = extract_features(extract_config(small_xrays, cache_dir=tmp_path / "b", augment_copies=0))
    assert blocked.cache_path.name == clean.cache_path.name and blocked.computed_rows == clean.computed_rows
    counted.clear()
    (again,) = extract_features(extract_config(small_xrays, cache_dir=tmp_path / "a", augment_copies=0))
    assert counted == [] and again.computed_rows == 0, "a rerun reads no image file to hash it"


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_parallel_hashing_keeps_record_order_and_reports_vanished_files(small_xrays, tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(extract, "HASH_CHUNK", chunk)
    folder = find_images(small_xrays, seed=0)
    gone = folder.records[5]
    (small_xrays / gone.path).unlink()
    for cache_dir in (None, tmp_path, tmp_path):
        files, unreadable = _hash_files(folder, cache_dir=cache_dir)
        assert [f.record for f in files] == [r for r in folder.records if r != gone]
        assert all(f.sha256 == hash_file(small_xrays / f.record.path) for f in files)
        assert unreadable == [{"path": gone.path, "error": "cannot read: No such file or directory"}]
