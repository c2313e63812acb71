"""The remembered weights hashes: what their key holds, and when a remembered hash is (not) given back."""

import importlib.metadata
import json
import os

import pytest

from featcache import weightsmemo
from featcache.weightsmemo import MEMO_FILE, WeightsMemo, memo_key, weights_stat

SHA = "ab" * 32


@pytest.fixture(autouse=True)
def keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setattr(weightsmemo, "RACY_SECONDS", 0)
    (tmp_path / "keras-home" / "models").mkdir(parents=True)
    return tmp_path / "keras-home"


def key(weights="random", **changes):
    args = {"backbone": "tiny", "image_size": 64, "weights": weights, "seed": 0, "feature_layer": None,
            "precision": "float32", **changes}
    return memo_key(**args)


def test_the_key_holds_everything_the_weights_hash_depends_on(keras_home, monkeypatch):
    base = key()
    assert base["versions"]["numpy"] and any(n.startswith("tensorflow") for n in base["versions"])
    for changed in (key(seed=1), key(image_size=96), key(backbone="vgg16"), key(feature_layer="tiny_conv3"),
                    key(precision="mixed")):
        assert changed != base
    (keras_home / "keras.json").write_text("{}")
    assert key() != base, "Keras's config file"
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert key()["keras_backend"] == "jax"
    imagenet = key("imagenet")
    (keras_home / "models" / "vgg16_notop.h5").write_bytes(b"x")
    assert key("imagenet") != imagenet, "a file in Keras's download folder"
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "99.0" if name == "keras" else real(name))
    assert key()["versions"]["keras"] == "99.0"


def test_no_key_without_an_installed_tensorflow(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert key() is None


def test_random_weights_are_remembered_and_read_back(tmp_path):
    memo = WeightsMemo(tmp_path)
    assert memo.lookup(key()) is None
    memo.remember(key(), key(), SHA, None)
    assert WeightsMemo(tmp_path).lookup(key()) == SHA
    assert WeightsMemo(tmp_path).lookup(key(seed=1)) is None


def test_a_key_that_changed_while_loading_is_not_remembered(tmp_path):
    WeightsMemo(tmp_path).remember(key(), key(seed=1), SHA, None)
    assert not (tmp_path / MEMO_FILE).exists()


def test_a_weights_file_passes_by_stat_or_by_content_only(tmp_path):
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"weights one")
    memo = WeightsMemo(tmp_path)
    before = weights_stat(str(weights))
    memo.remember(key(str(weights)), key(str(weights)), SHA, before)
    assert WeightsMemo(tmp_path).lookup(key(str(weights))) == SHA
    os.utime(weights, ns=(5, 5))  # new stat key, same bytes: re-read, still the same
    assert WeightsMemo(tmp_path).lookup(key(str(weights))) == SHA
    weights.write_bytes(b"weights two")  # same size, other bytes
    assert WeightsMemo(tmp_path).lookup(key(str(weights))) is None
    weights.unlink()
    assert WeightsMemo(tmp_path).lookup(key(str(weights))) is None


def test_a_weights_file_changed_during_the_load_is_not_remembered(tmp_path):
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"weights one")
    before = weights_stat(str(weights))
    weights.write_bytes(b"weights two, longer")
    WeightsMemo(tmp_path).remember(key(str(weights)), key(str(weights)), SHA, before)
    assert WeightsMemo(tmp_path).lookup(key(str(weights))) is None


def test_a_recently_changed_weights_file_is_not_remembered(tmp_path, monkeypatch):
    monkeypatch.setattr(weightsmemo, "RACY_SECONDS", 60)
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"weights one")
    WeightsMemo(tmp_path).remember(key(str(weights)), key(str(weights)), SHA, weights_stat(str(weights)))
    assert WeightsMemo(tmp_path).lookup(key(str(weights))) is None


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"format": "other", "version": 1}),
                                     json.dumps({"format": "featcache-weights-hashes", "version": 1,
                                                 "entries": {"x": {"weights_sha256": 5}}})])
def test_a_damaged_or_foreign_memo_is_ignored_and_replaced(tmp_path, content):
    (tmp_path / MEMO_FILE).write_text(content)
    memo = WeightsMemo(tmp_path)
    assert memo.lookup(key()) is None
    memo.remember(key(), key(), SHA, None)
    assert WeightsMemo(tmp_path).lookup(key()) == SHA


def test_a_read_only_cache_folder_is_no_error(tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        WeightsMemo(tmp_path / "ro").remember(key(), key(), SHA, None)
        assert WeightsMemo(tmp_path / "ro").lookup(key()) in (None, SHA)  # root may write anyway
    finally:
        os.chmod(tmp_path / "ro", 0o700)
