"""Shared fixtures: the real dev X-rays, small copies of them, synthetic image folders, extraction configs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the default suite is CPU-only, even where a GPU exists

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEATCACHE_SHARED_DATA", REPO.parent / "shared" / "data"))
DEV_DATA = SHARED_DATA / "chest_xray_dev"
BAD_INPUTS = SHARED_DATA / "bad_inputs"


@pytest.fixture(scope="session")
def dev_data() -> Path:
    """The real development X-rays (read-only)."""
    assert DEV_DATA.is_dir(), f"expected the dev data at {DEV_DATA} (set FEATCACHE_SHARED_DATA)"
    return DEV_DATA


@pytest.fixture(scope="session")
def bad_inputs() -> Path:
    assert BAD_INPUTS.is_dir(), f"expected the broken files at {BAD_INPUTS}"
    return BAD_INPUTS


def copy_subset(source: Path, target: Path, per_class: dict[str, int]) -> Path:
    """Copy the first N images of each ``split/class`` folder (sorted by name) into ``target``."""
    for key, count in per_class.items():
        folder = source / key
        (target / key).mkdir(parents=True, exist_ok=True)
        for file in sorted(folder.iterdir())[:count]:
            shutil.copyfile(file, target / key / file.name)
    return target


@pytest.fixture
def small_xrays(tmp_path, dev_data) -> Path:
    """A writable Kermany-layout folder of 24 train and 8 test real X-rays."""
    return copy_subset(dev_data, tmp_path / "xrays", {
        "train/NORMAL": 8, "train/PNEUMONIA": 16, "test/NORMAL": 4, "test/PNEUMONIA": 4,
    })


@pytest.fixture
def extract_config(tmp_path):
    """Factory of fast ExtractConfigs: the tiny backbone, 64 px, random weights, caches under tmp_path."""
    from featcache.config import ExtractConfig

    def make(data_dir: Path, **overrides) -> ExtractConfig:
        settings = dict(data_dir=data_dir, backbones=("tiny",), weights="random", augment_copies=2, image_size=64,
                        batch_size=8, seed=0, cache_dir=tmp_path / "cache", progress=False)
        settings.update(overrides)
        return ExtractConfig(**settings)

    return make


def write_png(path: Path, array: np.ndarray) -> Path:
    """Encode an (h, w, c) uint8/uint16 array as PNG with TensorFlow (no Pillow needed)."""
    import tensorflow as tf

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(array).numpy())
    return path


def read_datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file, by name, for whole-file comparisons."""
    import h5py

    out = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out


def corrupt_chunks(path: Path, name: str) -> int:
    """Overwrite the stored bytes of every chunk of dataset ``name`` in place (HDF5 metadata stays valid,
    the data is rotten); returns the number of chunks. A read of any of them must fail. A virtual dataset
    (a sharded cache's master) has its chunks in the shard files: those are rotted."""
    import h5py

    with h5py.File(path, "r") as handle:
        dataset = handle[name]
        if dataset.is_virtual:
            sources = sorted({(Path(path).parent / s.file_name, s.dset_name) for s in dataset.virtual_sources()})
            return sum(corrupt_chunks(source, source_name) for source, source_name in sources)
        chunks = [dataset.id.get_chunk_info(i) for i in range(dataset.id.get_num_chunks())]
    with open(path, "r+b") as raw:
        for chunk in chunks:
            raw.seek(chunk.byte_offset)
            data = raw.read(min(chunk.size, 64))
            raw.seek(chunk.byte_offset)
            raw.write(bytes(255 - b for b in data))
    return len(chunks)


def assert_same_datasets(a: Path, b: Path, float_tolerance: float = 0.0) -> None:
    """Two HDF5 files hold the same datasets: bit for bit, or floats within ``float_tolerance``."""
    da, db = read_datasets(a), read_datasets(b)
    assert da.keys() == db.keys()
    for name in da:
        if float_tolerance and da[name].dtype.kind == "f":
            np.testing.assert_allclose(da[name], db[name], rtol=float_tolerance, atol=float_tolerance, err_msg=name)
        else:
            assert np.array_equal(da[name], db[name]), name


# --- synthetic caches (train-head tests) -------------------------------------------------------


def write_synthetic_cache(cache_dir: Path, backbone: str = "tiny", *, n_train: int = 80, n_val: int = 40,
                          n_test: int = 20, copies: int = 2, feature_shape: tuple[int, int, int] = (2, 2, 16),
                          separation: float = 2.0, seed: int = 0, dtype: str = "float16", offset: float = 0.0,
                          scale: float = 1.0) -> Path:
    """A complete cache written through CacheWriter, with maps whose spatial mean is a class signal.

    Each image's pooled vector is ``relu(separation * direction * (label - 0.5) + noise)``; augmented
    copies add a little noise to it. The maps are that vector plus a fixed zero-mean spatial pattern, so
    their spatial average is the pooled vector, and /pooled is taken from the float32 maps as extraction does.
    ``offset`` and ``scale`` map every value v to ``offset * (1 + channel) + scale * v``: badly scaled
    features (large per-channel offsets, tiny spread), as random-weight backbones give.
    About 30 % of images are NORMAL (label 0), as in the Kermany data.
    """
    from featcache.cache import FORMAT_VERSION, CachePaths, compute_fingerprint
    from featcache.cachewrite import CacheWriter, FileTable

    rng = np.random.default_rng(seed)
    h, w, c = feature_shape
    splits = np.repeat([0, 1, 2], [n_train, n_val, n_test]).astype(np.uint8)
    labels = (rng.random(len(splits)) >= 0.3).astype(np.int16)
    labels[[0, n_train, n_train + n_val]] = 0  # every split holds both classes
    labels[[1, n_train + 1, n_train + n_val + 1]] = 1
    folder = {0: "train", 1: "train", 2: "test"}
    names = ("NORMAL", "PNEUMONIA")
    paths = [f"{folder[s]}/{names[y]}/img{i:05d}.jpeg" for i, (s, y) in enumerate(zip(splits, labels))]
    order = np.argsort(paths, kind="stable")  # rows are ordered by file path, as extraction writes them
    table = FileTable(path=[paths[i] for i in order], sha256=[f"{i:064x}" for i in order], label=labels[order],
                      split=splits[order], patient=[f"p{i}" for i in order])
    direction = rng.normal(size=c).astype(np.float32)
    base = separation * np.outer(table.label - 0.5, direction) + rng.normal(size=(len(table), c))
    pattern = rng.normal(size=(h, w, c)).astype(np.float32)
    pattern -= pattern.mean(axis=(0, 1))
    rows = [(f, k) for f in range(len(table)) for k in range(copies + 1 if table.split[f] == 0 else 1)]
    pooled_in = np.stack([base[f] + (0.3 * rng.normal(size=c) if k else 0) for f, k in rows]).astype(np.float32)
    maps = np.maximum(pooled_in, 0)[:, None, None, :] + 0.1 * pattern
    maps = (offset * (1 + np.arange(c, dtype=np.float32)) + scale * maps).astype(np.float32)
    settings = {"synthetic": True, "seed": seed, "separation": separation, "shape": feature_shape, "rows": len(rows),
                "copies": copies, "backbone": backbone, "dtype": dtype, "offset": offset, "scale": scale}
    fingerprint = compute_fingerprint(settings)
    writer = CacheWriter(CachePaths.for_fingerprint(cache_dir, backbone, fingerprint).final, table, len(rows),
                         feature_shape, dtype)
    index = np.array([f for f, _ in rows])
    writer.write_rows(0, maps.astype(dtype), maps.mean(axis=(1, 2)), labels=table.label[index],
                      split=table.split[index], source_index=index.astype(np.int32),
                      copy_index=np.array([k for _, k in rows], np.int16))
    counts = {"train": n_train, "val": n_val, "test": n_test, "train_copies": n_train * copies, "rows": len(rows)}
    return writer.commit({
        "fingerprint": fingerprint, "backbone": backbone, "class_names": list(names), "image_size": 32 * h,
        "feature_shape": list(feature_shape), "dtype": dtype, "format_version": FORMAT_VERSION, "counts": counts,
        "weights": {"source": "random", "sha256": "0" * 64}, "seed": seed,
    })


@pytest.fixture
def synthetic_cache(tmp_path):
    """Factory: ``synthetic_cache(**overrides) -> Path`` of a complete synthetic cache in tmp_path/cache."""

    def make(**overrides) -> Path:
        return write_synthetic_cache(overrides.pop("cache_dir", tmp_path / "cache"), **overrides)

    return make


# --- PostgreSQL (shared-study tests) ------------------------------------------------------------


POSTGRES_BINARIES = "/usr/lib/postgresql/*/bin"


def _skip_or_fail(reason: str, service: str = "PostgreSQL"):
    """Skip on a developer's machine; in CI (env CI set) a test that needs a service must run, so fail."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the {service} tests (.ci/run installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of a Chromium (or Chrome) binary for headless rendering checks."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    _skip_or_fail("no Chromium on PATH (apt-get install chromium)", "Chromium")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_cluster(root: Path) -> tuple[str, list[str]]:
    """initdb + pg_ctl start of a throwaway cluster in ``root`` on 127.0.0.1 (trust auth, fsync off);
    returns its admin URL and the command that stops it."""
    import glob
    import subprocess

    found = sorted(glob.glob(f"{POSTGRES_BINARIES}/initdb"))
    if not found:
        _skip_or_fail(f"PostgreSQL server binaries not found under {POSTGRES_BINARIES} (apt-get install postgresql, "
                      f"or set FEATCACHE_TEST_POSTGRES_URL)")
    bin_dir = Path(found[-1]).parent  # the newest version installed
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses to run as root
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "featcache", "--auth=trust",
                    "-E", "UTF8", "--locale=C", "--no-sync"], check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
                    "-w", "-t", "60", "start"], check=True, capture_output=True)
    stop = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
    return f"postgresql://featcache@127.0.0.1:{port}/postgres", stop


@pytest.fixture(scope="session")
def postgres_server():
    """The admin URL of a PostgreSQL server for the session: ``FEATCACHE_TEST_POSTGRES_URL`` (its user must be
    allowed to create databases), else a throwaway cluster started here and stopped and deleted at the end."""
    import subprocess
    import tempfile

    try:
        import psycopg  # noqa: F401 - the driver of postgresql:// URLs (SQLAlchemy 2.1)
    except ImportError:
        _skip_or_fail("psycopg is not installed (pip install -e '.[postgres]')")
    url = os.environ.get("FEATCACHE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    root = Path(tempfile.mkdtemp(prefix="featcache-pg-"))
    try:
        url, stop = _start_cluster(root)
    except (subprocess.CalledProcessError, LookupError, OSError) as exc:  # LookupError: no user postgres (root)
        log = (root / "log").read_text() if (root / "log").is_file() else ""
        shutil.rmtree(root, ignore_errors=True)
        _skip_or_fail(f"could not start a PostgreSQL cluster ({exc}; {getattr(exc, 'stderr', '')!r} {log[-500:]})")
    try:
        yield url
    finally:
        subprocess.run(stop, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A URL of a new, empty database on the session's server (each test its own studies)."""
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    name = f"featcache_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return make_url(postgres_server).set(database=name).render_as_string(hide_password=False)
