"""The stat-keyed hash cache of ``extract``: reuse only on a whole-key match, never trust a bad file."""

import json
import logging
import os

import pytest

import featcache.extract as extract
from featcache import hashcache
from featcache.data import find_images, hash_file
from featcache.extract import _hash_files, extract_features
from featcache.hashcache import HASHES_FILE


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


@pytest.mark.parametrize("content", [b"{not json", b'{"format": "other", "version": 1, "roots": {}}', b"[1, 2]",
                                     b"\xff\xfe"])
def test_a_damaged_or_foreign_hash_file_is_ignored_and_rebuilt(small_xrays, tmp_path, counted, content, caplog):
    folder = find_images(small_xrays, seed=0)
    expected, _ = _hash_files(folder)
    (tmp_path / HASHES_FILE).write_bytes(content)
    counted.clear()
    with caplog.at_level(logging.INFO, logger="featcache.hashcache"):
        got, _ = _hash_files(folder, cache_dir=tmp_path)
    assert got == expected and len(counted) == len(folder.records)
    assert "ignoring the hash cache" in caplog.text
    assert json.loads((tmp_path / HASHES_FILE).read_text())["format"] == "featcache-hashes"


def test_a_lying_entry_is_not_trusted_unless_its_whole_key_matches(small_xrays, tmp_path, counted):
    folder = find_images(small_xrays, seed=0)
    expected, _ = _hash_files(folder, cache_dir=tmp_path)
    record = json.loads((tmp_path / HASHES_FILE).read_text())
    (entries,) = record["roots"].values()
    path = folder.records[0].path
    entries[path][2] += 1  # another ctime: the stored hash must not be used
    entries[path][5] = "0" * 64
    entries[folder.records[1].path][5] = "short"  # malformed entry: dropped
    (tmp_path / HASHES_FILE).write_text(json.dumps(record))
    counted.clear()
    got, _ = _hash_files(folder, cache_dir=tmp_path)
    assert got == expected and sorted(counted) == sorted(os.path.basename(r.path) for r in folder.records[:2])


def test_other_data_folders_entries_are_kept(small_xrays, tmp_path, counted):
    folder = find_images(small_xrays, seed=0)
    other = tmp_path / "other"
    (other / "train" / "A").mkdir(parents=True)
    (tmp_path / HASHES_FILE).write_text(json.dumps({"format": "featcache-hashes", "version": 1,
                                                    "roots": {str(other): {"x.png": [1, 2, 3, 4, 5, "a" * 64]}}}))
    _hash_files(folder, cache_dir=tmp_path)
    roots = json.loads((tmp_path / HASHES_FILE).read_text())["roots"]
    assert roots[str(other)] == {"x.png": [1, 2, 3, 4, 5, "a" * 64]} and len(roots) == 2


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
