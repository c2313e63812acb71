"""The HDF5 feature cache: layout, manifest, fingerprint, readers (its writers: ``featcache.cachewrite``).

A finished cache is ``<cache-dir>/<backbone>-<fingerprint[:12]>.h5``. It is written under a
``.incomplete`` name and renamed when complete, so a file with the final name is always whole.
Work in progress lives in ``<name>.partial/`` (see ``featcache.partial``).

Since format 3 the cache is sharded: the rows' maps live in shard files ``<name>.shards/<id>.h5``
(``featcache.shards``; each whole, atomic, with its own SHA-256s) and the ``.h5`` is a small master
file (``featcache.master``) in which /features and /pooled are HDF5 virtual datasets over the shards
(relative paths: the folder can be moved whole), every other dataset is a real one, and the manifest
also lists the shards it maps with their seals (``manifest["shards"]``). Every reader opens the master
as before; ``open_cache`` first checks that each listed shard exists and is the one the master was
built from. Shards depend only on the settings (the fingerprint), so a new file list writes only the
shards of its new rows plus a new master; rows of removed or changed files stay in their old shards
(mapped by nothing) until ``featcache compact`` merges the cache into one plain file (same layout, no
virtual datasets, ``shards`` dropped) and deletes unmapped shards. A format-2 file (always plain) is
read as it is; extract writes format 3 under a new name (the format is part of the fingerprint).

Layout (n rows, m files; rows ordered by file path, then copy index, whatever the shards)::

    /features      (n, h, w, c) float16|float32   backbone maps (virtual over the shards, or plain)
    /pooled        (n, c) float32                 global average of each map, from float32 maps (idem)
    /labels        (n,) int16                     class index into manifest["class_names"]; -1 in a multi-label cache
    /targets       (n, k) float32                 multi-label caches only (manifest["task"] == "multilabel"): 0/1
                                                  per label of manifest["class_names"], NaN where masked
    /split         (n,) uint8                     0 train, 1 val, 2 test
    /source_index  (n,) int32                     row of /files the image came from
    /copy_index    (n,) int16                     0 original, 1..K augmented copies (train only)
    /files/path    (m,) str                       relative to the data folder
    /files/sha256  (m,) bytes                     content hash of the file
    /files/label, /files/split (m,), /files/patient (m,) str

A multi-label cache (several 0/1 columns of a label file) has no class index: its /labels and /files/label are
-1 everywhere (never a valid class, so nothing can read them as a binary label; the value checks refuse any
other value there), its targets are /targets, and its manifest says ``"task": "multilabel"``. Binary and
multi-class caches have no /targets and no ``task`` key: their files and fingerprints are as before.
    attrs: manifest (JSON; ``datasets`` holds each dataset's shape, dtype and SHA-256 in row order,
           ``shards`` each mapped shard's file, rows and seal), manifest_sha256 (of the manifest's text),
           format_version, fingerprint, complete
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from featcache.applications import registry_key
from featcache.checksums import H5_ERRORS, check_layout, read_checked
from featcache.data import SPLIT_CODES
from featcache.errors import (
    CacheMismatchError,
    DamagedFileError,
    FeatcacheError,
    IncompleteCacheError,
)
from featcache.integrity import first_line, parse_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: per-dataset SHA-256 in the manifest, fletcher32; 3: /features, /pooled may be virtual
READ_VERSIONS = (2, 3)  # a format-2 file is a plain cache: read as it is (extract writes format 3 beside it)
SHARDS_SUFFIX = ".shards"
SUFFIX = ".h5"
PARTIAL_SUFFIX = ".partial"
INCOMPLETE_SUFFIX = ".incomplete"
POOLED_CHUNK_ROWS = 1024  # rows of a /pooled chunk (plain caches and shards); train-head's epoch blocks
# Past this many mapped runs (incremental extracts interleave new rows with old ones), reading through the
# virtual datasets costs visibly more than a compacted file (3,749 runs: 0.46 s against 0.02 s for a checked
# read of 117,157 rows; BENCHMARKS.md); extract and describe then suggest 'featcache compact'.
COMPACT_HINT_RUNS = 1000
READ_CACHE_BYTES = 64 * 2**20  # HDF5 chunk cache for readers: several feature chunks
MULTILABEL = "multilabel"  # manifest["task"] of a multi-label cache
# What every reader relies on; a manifest without them is not featcache's.
MANIFEST_FIELDS = {"fingerprint": str, "backbone": str, "class_names": list, "datasets": dict}


def is_multilabel(manifest: dict) -> bool:
    """A cache (or a head, card or report that copies its task) of several 0/1 labels: /targets, not /labels."""
    return manifest.get("task") == MULTILABEL


def compute_fingerprint(settings: dict) -> str:
    """SHA-256 of everything that changes the features, plus the cache format version."""
    payload = json.dumps({"format_version": FORMAT_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class CachePaths:
    """Where one cache and its work in progress live."""

    cache_dir: Path
    name: str

    @classmethod
    def for_fingerprint(cls, cache_dir: str | Path, backbone: str, fingerprint: str) -> "CachePaths":
        return cls(Path(cache_dir), f"{backbone}-{fingerprint[:12]}")

    @property
    def final(self) -> Path:
        return self.cache_dir / f"{self.name}{SUFFIX}"

    @property
    def partial(self) -> Path:
        return self.cache_dir / f"{self.name}{PARTIAL_SUFFIX}"

    @property
    def shards(self) -> Path:
        """The shard files of these settings (see ``featcache.shards``)."""
        return self.cache_dir / f"{self.name}{SHARDS_SUFFIX}"

    @property
    def weights(self) -> Path:
        """Saved backbone weights (random initialisations only), next to the cache."""
        return self.cache_dir / f"{self.name}.weights.h5"


def read_manifest(path: str | Path) -> dict:
    """The manifest of a complete cache file.

    Raises:
        IncompleteCacheError: the file is still being written or was left by a killed run.
        CacheMismatchError: the file is not a featcache cache, or of another format version.
    """
    with open_cache(path) as handle:
        return json.loads(handle.attrs["manifest"])


def open_cache(path: str | Path) -> h5py.File:
    """Open a complete cache read-only, after checking that it is complete, of this format, with a valid
    manifest and every dataset the manifest records (metadata only: ``checksums.read_checked`` checks data).

    Raises:
        IncompleteCacheError: the file is unfinished.
        CacheMismatchError: not an HDF5 file, or another format version.
        DamagedFileError: damaged metadata, a manifest that is not featcache's, missing or odd datasets.
    """
    path = Path(path)
    if path.name.endswith(INCOMPLETE_SUFFIX) or path.suffix == PARTIAL_SUFFIX:
        raise IncompleteCacheError(f"{path} is an unfinished cache; re-run 'featcache extract' to complete it.")
    if not path.is_file():
        raise FeatcacheError(f"No cache file {path}; run 'featcache extract' first.")
    try:
        handle = h5py.File(path, "r", rdcc_nbytes=READ_CACHE_BYTES)
    except OSError as exc:
        raise CacheMismatchError(f"{path} is not a readable HDF5 cache ({first_line(exc)}); delete it and re-run "
                                 f"'featcache extract'. Received: file={str(path)!r}") from None
    try:
        _check_header(handle, path)
    except BaseException:
        handle.close()
        raise
    return handle


def _check_header(handle: h5py.File, path: Path) -> None:
    try:
        attrs = dict(handle.attrs)
        if not attrs.get("complete", False) or "manifest" not in attrs:
            raise IncompleteCacheError(f"{path} is not marked complete; re-run 'featcache extract' to rebuild it.")
        version = attrs.get("format_version")
        if version not in READ_VERSIONS:
            raise CacheMismatchError(
                f"{path} has cache format version {version}; this featcache reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}. "
                f"Re-run 'featcache extract' with a new --cache-dir. Received: format_version={version}"
            )
        text = attrs["manifest"]
        manifest = parse_json(text, f"{path} (attribute 'manifest')", MANIFEST_FIELDS,
                              "delete the cache and re-run 'featcache extract'.")
        if attrs.get("manifest_sha256") != text_sha256(text):
            raise DamagedFileError(f"Cache {path}: its manifest was edited since it was written (manifest_sha256 "
                                   f"differs); delete it and re-run 'featcache extract'. Received: file={str(path)!r}")
        check_layout(handle, manifest)
        check_shards(handle, path, manifest)
    except FeatcacheError:
        raise
    except H5_ERRORS as exc:  # h5py on damaged object headers
        raise DamagedFileError(f"Cache {path} has damaged metadata ({first_line(exc)}); delete it and re-run "
                               f"'featcache extract'. Received: file={str(path)!r}") from None


def _mapped_files(dataset: h5py.Dataset) -> set[str]:
    """The source file names a virtual dataset maps (what ``virtual_sources()`` names, without building its
    thousands of selections); empty for a plain dataset."""
    dcpl = dataset.id.get_create_plist()
    if dcpl.get_layout() != h5py.h5d.VIRTUAL:
        return set()
    return {dcpl.get_virtual_filename(j) for j in range(dcpl.get_virtual_count())}


def mapped_runs(dataset: h5py.Dataset) -> int:
    """How many runs of rows a virtual dataset maps from its source files (0 for a plain dataset)."""
    dcpl = dataset.id.get_create_plist()
    return dcpl.get_virtual_count() if dcpl.get_layout() == h5py.h5d.VIRTUAL else 0


def compact_hint(runs: int) -> list[str]:
    """The line that suggests ``featcache compact`` for a master of ``runs`` mappings, when it pays."""
    if runs <= COMPACT_HINT_RUNS:
        return []
    return [f"  /features maps {runs:,} runs of rows (many incremental extracts): 'featcache compact' merges the "
            f"cache into one file, which reads faster"]


def check_shards(handle: h5py.File, path: Path, manifest: dict) -> None:
    """Every shard a master maps exists and is the very file it was built from (its seal), and the
    virtual datasets map nothing else: HDF5 reads a missing source as fill values, without an error.

    Raises:
        DamagedFileError: one line naming the first missing, unreadable or replaced shard file.
    """
    from featcache.shards import read_seal  # shards imports this module

    listed = manifest.get("shards", [])
    files = {entry.get("file") for entry in listed if isinstance(entry, dict)}
    for name in ("features", "pooled"):
        if not _mapped_files(handle[name]) <= files:
            raise DamagedFileError(f"Cache {path}: /{name} maps files its manifest does not list; delete it and "
                                   f"re-run 'featcache extract'. Received: file={str(path)!r}")
    for entry in listed:
        shard = path.parent / entry["file"]
        try:
            _, seal = read_seal(shard)
        except DamagedFileError:
            reason = "is missing" if not shard.is_file() else "cannot be read or is not a complete, unedited shard"
            raise DamagedFileError(
                f"Cache {path}: its shard file {shard} {reason}; restore it, or delete {path.name} "
                f"and re-run 'featcache extract' (rows of the other shards are reused). Received: shard={entry['file']!r}"
            ) from None
        if seal != entry.get("seal"):
            raise DamagedFileError(
                f"Cache {path}: its shard file {shard} was replaced (its seal differs from the manifest's); restore "
                f"it, or delete {path.name} and re-run 'featcache extract'. Received: shard={entry['file']!r}")


def cache_bytes(path: str | Path) -> int:
    """Bytes on disk of a cache: the master file plus every shard it maps (shards shared with nothing else)."""
    path = Path(path)
    total = path.stat().st_size
    with contextlib.suppress(*H5_ERRORS, ValueError):
        with h5py.File(path, "r") as handle:
            shards = json.loads(handle.attrs["manifest"]).get("shards", [])
        total += sum((path.parent / entry["file"]).stat().st_size for entry in shards)
    return total


def list_caches(cache_dir: str | Path, backbone: str | None = None) -> list[Path]:
    """Complete cache files in a folder (by name; ``open_cache`` checks the contents)."""
    pattern = f"{registry_key(backbone)}-*{SUFFIX}" if backbone else f"*{SUFFIX}"  # any spelling of the name
    return sorted(p for p in Path(cache_dir).glob(pattern) if not p.name.endswith(".weights.h5"))


def find_cache(cache_dir: str | Path, backbone: str) -> Path:
    """The one complete cache of a backbone in a folder.

    Raises:
        IncompleteCacheError: only an unfinished extraction exists.
        FeatcacheError: none, or several to choose from.
    """
    backbone = registry_key(backbone)
    found = list_caches(cache_dir, backbone)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise FeatcacheError(f"{cache_dir} holds {len(found)} caches for {backbone} ({names}); pass --cache FILE.")
    if list(Path(cache_dir).glob(f"{backbone}-*{PARTIAL_SUFFIX}")):
        raise IncompleteCacheError(
            f"The {backbone} cache in {cache_dir} is incomplete (an extract is running or was killed); "
            "re-run 'featcache extract' to finish it."
        )
    raise FeatcacheError(f"No {backbone} cache in {cache_dir}; run 'featcache extract --backbone {backbone}' first.")


@dataclass(frozen=True)
class PooledData:
    """The small per-row arrays of a cache's rows in some splits: what head training needs besides the maps."""

    pooled: np.ndarray  # (n, c) float32
    labels: np.ndarray  # (n,)
    split: np.ndarray  # (n,) codes
    copy_index: np.ndarray  # (n,)
    source_index: np.ndarray  # (n,)
    manifest: dict
    targets: np.ndarray | None = None  # (n, k) float32, NaN masked: multi-label caches only


def load_pooled(path: str | Path, splits: tuple[str, ...] = ("train", "val", "test")) -> PooledData:
    """Read pooled vectors and row columns of the rows in ``splits`` (never the 7x7 maps), each checked
    against the SHA-256 recorded when the cache was written; nothing of other splits but their split code.

    Raises:
        DamagedFileError: edited or damaged arrays, out-of-range values (see ``checksums.read_checked``).
    """
    with open_cache(path) as handle:
        split = read_checked(handle, "split")
        return PooledData(
            pooled=read_checked(handle, "pooled", split, splits),
            labels=read_checked(handle, "labels", split, splits),
            split=split[np.isin(split, [SPLIT_CODES[s] for s in splits])],
            copy_index=read_checked(handle, "copy_index", split, splits),
            source_index=read_checked(handle, "source_index", split, splits),
            manifest=json.loads(handle.attrs["manifest"]),
            targets=read_checked(handle, "targets", split, splits) if "targets" in handle else None,
        )


def read_rows(dataset: h5py.Dataset, indices: np.ndarray) -> np.ndarray:
    """Rows at increasing ``indices``, read as contiguous slices (much faster than h5py fancy indexing)."""
    indices = np.asarray(indices)
    if len(indices) == 0:
        return np.empty((0, *dataset.shape[1:]), dataset.dtype)
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    parts = [dataset[int(run[0]): int(run[-1]) + 1] for run in np.split(indices, breaks)]
    return np.concatenate(parts)


def text_sha256(text) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else bytes(text)).hexdigest()


def describe_cache(path: str | Path) -> str:
    """A readable account of one cache file, or of every cache in a folder."""
    path = Path(path)
    if path.is_dir():
        caches = list_caches(path)
        partial = sorted(p.name for p in path.glob("*.partial"))
        if not caches and not partial:
            raise FeatcacheError(f"No caches in {path}; run 'featcache extract' first.")
        parts = [describe_cache(p) for p in caches]
        parts += [f"{name}: incomplete (an extract is running or was killed)" for name in partial]
        return "\n\n".join(parts)
    with open_cache(path) as handle:
        manifest = json.loads(handle.attrs["manifest"])
        shape, dtype = handle["features"].shape, handle["features"].dtype
        runs = mapped_runs(handle["features"])
    c = manifest["counts"]
    return "\n".join([
        f"{path} ({cache_bytes(path) / 2**20:.1f} MiB"
        + (f": the master and {len(manifest['shards'])} shard files, {runs:,} runs of rows mapped"
           if manifest.get("shards") else "") + ")",
        *compact_hint(runs),
        f"  backbone {manifest['backbone']}, weights {manifest['weights']['source']} "
        f"(sha256 {manifest['weights']['sha256'][:12]}), image size {manifest['image_size']}",
        f"  features {tuple(shape)} {dtype}"
        + (f" from layer {manifest['feature_layer']}" if manifest.get("feature_layer") else "")
        + f", preprocessing {manifest.get('preprocessing', {}).get('mode', '?')}, "
        f"fingerprint {manifest['fingerprint'][:12]}",
        f"  originals: train {c['train']}, val {c['val']}, test {c['test']}; copies {c['train_copies']}; "
        f"skipped {c['skipped']}",
        f"  {'labels (multi-label)' if is_multilabel(manifest) else 'classes'} {manifest['class_names']}, seed {manifest['seed']}, created {manifest['created']}",
        f"  labels {_labels_text(manifest)}; patients {_patients_text(manifest)}",
        "  manifest: " + json.dumps(manifest, sort_keys=True),
    ])


def _labels_text(manifest: dict) -> str:
    labels = manifest.get("labels")
    if not labels:
        return "from the class folders"
    return (f"from {labels.get('file', 'a label file')} (sha256 {labels['sha256'][:12]}), columns "
            f"{','.join(labels['columns'])}, uncertain {labels['uncertain']}")


def _patients_text(manifest: dict) -> str:
    rules = manifest.get("split", {}).get("patient_rules") or []
    return "; ".join(["Kermany file names", *rules]) if rules else "Kermany file names (one per file otherwise)"
