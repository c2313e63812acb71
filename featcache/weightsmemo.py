"""Remembered backbone weights hashes, so that ``extract`` with nothing to do never imports TensorFlow.

A cache's fingerprint holds ``hash_weights`` of its backbone, which takes building the model (TensorFlow:
about a minute to import on a loaded machine). This file remembers it in ``<cache-dir>/.weights-hashes.json``,
under a key of everything the hash depends on, read without importing TensorFlow or Keras:

- every source: backbone, image size, feature layer, precision, the installed tensorflow/keras/h5py/numpy
  versions (``importlib.metadata``), Keras's ``keras.json`` and ``KERAS_BACKEND``, and the source of the
  modules that build the backbones;
- ``random``: the seed;
- a weights file: its resolved path, and its (size, mtime_ns, ctime_ns, inode, device) stat key; when only
  the stat changed, the file is hashed again (cheap beside TensorFlow) and the remembered hash is reused
  only if its SHA-256 is the one remembered;
- ``imagenet``: the stat keys of every file in Keras's download folder (``<keras home>/models``).

Anything that does not match exactly is a miss, and extract takes its full path (builds the backbone,
hashes it, refuses a weights file that does not fit). Like ``hashcache``, the file is an optimisation:
damaged or foreign is ignored, a failed write is a debug log, writes are atomic, and a file changed less
than ``RACY_SECONDS`` before it was read is not remembered.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from featcache import __version__
from featcache.hashcache import RACY_SECONDS, stat_key, write_optional_json

log = logging.getLogger(__name__)

MEMO_FILE = ".weights-hashes.json"
FORMAT = "featcache-weights-hashes"
VERSION = 1
MAX_ENTRIES = 64
DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos", "tf-nightly", "keras",
                 "keras-nightly", "h5py", "numpy")
BUILD_MODULES = ("backbones.py", "applications.py", "feature_layers.py")


def memo_key(backbone: str, image_size: int, weights: str, seed: int, feature_layer: str | None,
             precision: str) -> dict | None:
    """What ``hash_weights`` of this backbone depends on (stat keys of weights files apart), or None where it
    cannot be told without TensorFlow (no installed tensorflow/keras found)."""
    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if not any(name.startswith(("tensorflow", "tf-")) for name in versions) or not versions.keys() & {
            "keras", "keras-nightly"}:
        return None
    source = weights if weights in ("random", "imagenet") else "file"
    key = {"backbone": backbone, "image_size": image_size, "source": source, "feature_layer": feature_layer,
           "precision": precision, "versions": versions, "featcache": __version__, "code": _code_digest(),
           "keras_json": _stat_or_none(Path(os.path.expanduser(_keras_home())) / "keras.json"),
           "keras_backend": os.environ.get("KERAS_BACKEND")}
    if source == "random":
        key["seed"] = seed
    elif source == "file":
        key["path"] = str(Path(weights).resolve())
    else:
        key["download_folder"] = _folder_listing(_download_folder())
    return key


class WeightsMemo:
    """``lookup`` a remembered weights hash; ``remember`` one the full path has just computed."""

    def __init__(self, cache_dir: str | Path):
        self.path = Path(cache_dir) / MEMO_FILE
        self.entries: dict[str, dict] = self._load()

    def _load(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as handle:
                record = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.info("ignoring the weights-hash memo %s (%s)", self.path, exc)
            return {}
        if not isinstance(record, dict):
            record = {}
        entries = record.get("entries")
        if record.get("format") != FORMAT or record.get("version") != VERSION or not isinstance(entries, dict):
            log.info("ignoring the weights-hash memo %s (not a featcache memo of version %d)", self.path, VERSION)
            return {}
        return {k: v for k, v in entries.items() if isinstance(v, dict)}

    def lookup(self, key: dict | None) -> str | None:
        """The remembered weights hash for ``key``, or None. A weights file whose stat key changed is hashed
        again and passes only with the remembered content SHA-256."""
        entry = self.entries.get(_digest(key)) if key is not None else None
        sha = entry.get("weights_sha256") if entry and entry.get("key") == key else None
        if not (isinstance(sha, str) and len(sha) == 64):
            return None
        if key["source"] != "file":
            return sha
        try:
            if entry.get("stat") == [*stat_key(key["path"])]:
                return sha
            return sha if _file_sha256(key["path"]) == entry.get("file_sha256") else None
        except OSError:
            return None

    def remember(self, key: dict | None, again: dict | None, weights_sha256: str, before: tuple | None) -> None:
        """Keep ``weights_sha256`` for ``key``, taken before the backbone was loaded (``before``: the weights
        file's stat key then); ``again`` is the same key taken after. Nothing is kept when they differ (a
        download, an edit) or the weights file changed meanwhile or just before."""
        if key is None or key != again:
            return
        entry = {"key": key, "weights_sha256": weights_sha256}
        if key["source"] == "file":
            try:
                now = stat_key(key["path"])
                entry["file_sha256"] = _file_sha256(key["path"])
                if before != now or stat_key(key["path"]) != now or _is_racy(now):
                    return
            except OSError:
                return
            entry["stat"] = [*now]
        if key["source"] == "imagenet" and any(_is_racy(s) for _, *s in key["download_folder"]):
            return
        name = _digest(key)
        if self.entries.get(name) == entry:
            return
        self.entries.pop(name, None)
        self.entries[name] = entry
        self._save(dict(list(self.entries.items())[-MAX_ENTRIES:]))

    def _save(self, entries: dict) -> None:
        write_optional_json(self.path, {"format": FORMAT, "version": VERSION, "entries": entries},
                            "the weights-hash memo", "the next rerun imports TensorFlow")


def weights_stat(weights: str) -> tuple | None:
    """The stat key of a weights file (None for ``random``/``imagenet`` or a missing file)."""
    if weights in ("random", "imagenet"):
        return None
    try:
        return stat_key(weights)
    except OSError:
        return None


def _keras_home() -> str:
    """Keras's own choice of its folder (keras/src/backend/config.py), without importing Keras."""
    if "KERAS_HOME" in os.environ:
        return os.environ["KERAS_HOME"]
    base = os.path.expanduser("~")
    return os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")


def _download_folder() -> Path:
    """Where ``keras.utils.get_file`` keeps the ImageNet weights: ``<keras home>/models``, or
    ``/tmp/.keras/models`` when the home is not writable (keras/src/utils/file_utils.py)."""
    home = os.path.expanduser(_keras_home())
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    return Path(home) / "models"


def _folder_listing(folder: Path) -> list:
    """[relative path, size, mtime_ns, ctime_ns, inode, device] of every file under ``folder``, sorted."""
    listing = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            try:
                listing.append([os.path.relpath(path, folder), *stat_key(path)])
            except OSError:
                continue
    return sorted(listing)


def _stat_or_none(path: Path) -> list | None:
    try:
        return [*stat_key(path)]
    except OSError:
        return None


def _code_digest() -> str:
    """SHA-256 of the featcache modules that build backbones: editing them changes what a seed builds."""
    digest = hashlib.sha256()
    for name in BUILD_MODULES:
        digest.update((Path(__file__).with_name(name)).read_bytes())
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _is_racy(key) -> bool:
    """Changed so recently that a further change could keep the same timestamps (see ``hashcache``)."""
    limit = time.time_ns() - RACY_SECONDS * 1e9
    return key[1] >= limit or key[2] >= limit


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
