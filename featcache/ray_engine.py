"""``featcache extract --engine ray``: the backbone in a Ray actor pool, one shard file per actor call.

The driver (``extract._extract_backbone``) plans exactly as the local engine does: the same missing rows
in the same canonical order, cut into the same fixed batches (``compute.plan_batches``). This module
groups those batches into shards the way ``ShardPacker`` does (whole batches until ``shard_rows`` rows)
and turns the shard plan into a Ray Dataset, one row per shard:

    plan rows --map_batches(_decode)--> decoded uint8 images and augmented copies (CPU tasks next to
                GPU actors; on a cluster without GPUs fused into the CPU actors, see ``pool_resources``)
              --map_batches(ShardWriter, actor pool)--> backbone per planned batch (padded like the local
                engine), then the whole shard written by the actor (``shards.write_shard``: atomic, sealed)
              --> the driver records each finished shard; ``extract`` writes the master file.

Each actor builds the backbone once, from the driver's weights (sent through the object store and
checked against the weights hash in the fingerprint), so features equal the local engine's: same
batches, same padding, same float32 graph. The engine never enters the fingerprint. A killed driver or
actor loses only the shards in flight: a rerun (either engine) indexes the shards on disk and computes
only the missing rows. Ray is imported here only, and only for ``--engine ray``.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from featcache.errors import FeatcacheError, WeightsError

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "featcache[ray]"'
DECODE_THREADS = 2  # per decode call: file reads and TF decode release the GIL
DECODE_ON_CPU_CLUSTERS = "actor"  # where decoding runs without GPUs: see pool_resources and BENCHMARKS.md


def import_ray():
    """``ray`` and ``ray.data``, or one line naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise FeatcacheError(f"--engine ray needs Ray Data, which is not installed; install the extra with "
                             f"{INSTALL_HINT}. Received: {type(exc).__name__}: {exc}") from None
    return ray


def connect(address: str | None) -> dict:
    """Join the Ray cluster at ``address`` (``auto``: the one ``ray start`` began on this machine), or start a
    local one when there is none; a session that is already connected is used as it is.

    Returns:
        The cluster's resources (``CPU``, ``GPU``, ...).
    """
    ray = import_ray()
    if not ray.is_initialized():
        target = reachable_address(address)
        try:
            ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if _refused_token(exc):
                hint = ("the cluster refused this driver's token: give it the cluster's with RAY_AUTH_MODE=token "
                        "and RAY_AUTH_TOKEN (or ~/.ray/auth_token)")
            else:
                hint = "start one with 'ray start --head' or drop --ray-address"
            raise FeatcacheError(f"Cannot connect to the Ray cluster at {address!r} ({str(exc).splitlines()[0]}); "
                                 f"{hint}. Received: ray_address={address!r}") from None
    return dict(ray.cluster_resources())


def reachable_address(address: str | None) -> str | None:
    """What ``ray.init`` gets for ``--ray-address``, after checking that something listens where it will look.

    Ray resolves no address and ``auto`` as its ``ray.init`` documents: ``RAY_ADDRESS``, else the cluster
    that ``ray start`` last recorded in ``<temp>/ray/ray_current_cluster``. A cluster killed without
    ``ray stop`` leaves that record behind, and ``ray.init`` then retries its address for many minutes. So:
    without ``--ray-address`` a stale record starts a local Ray instead (with a warning); with an address (or
    ``RAY_ADDRESS``) where nothing listens, one line. Addresses that are not ``host:port`` go to Ray as given.

    Raises:
        FeatcacheError: nothing accepts a connection at the address to be used (3 s).
    """
    target, source = address, "--ray-address"
    if os.environ.get("RAY_ADDRESS"):
        target, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if target in (None, "auto"):
        record = _ray_temp_dir() / "ray_current_cluster"
        try:
            target, source = record.read_text().strip(), str(record)
        except OSError:
            return address  # no record: Ray starts a local cluster (None) or looks for running ones (auto)
    host, _, port = target.rpartition(":")
    if not port.isdigit() or "://" in host or _listening(host.strip("[]"), int(port)):
        return address
    if address is None and source != "RAY_ADDRESS":
        log.warning("%s names a Ray cluster at %s, where nothing listens (stopped without 'ray stop'?); "
                    "starting a local Ray", source, target)
        return "local"
    raise FeatcacheError(f"Nothing listens at the Ray cluster address {target} (from {source}); start one with "
                         f"'ray start --head', or drop --ray-address for a local Ray. Received: ray_address={address!r}")


def _ray_temp_dir() -> Path:
    """Ray's default temporary folder (``ray._common.utils.get_default_ray_temp_dir``)."""
    if "RAY_TMPDIR" in os.environ:
        return Path(os.environ["RAY_TMPDIR"]) / "ray"
    if sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        return Path(os.environ["TMPDIR"]) / "ray"
    return Path("/tmp" if sys.platform.startswith(("linux", "darwin")) else tempfile.gettempdir()) / "ray"


def _listening(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _refused_token(exc: BaseException) -> bool:
    """Whether Ray's connection error came from the cluster's token authentication (Ray >= 2.52): an
    ``AuthenticationError`` in the chain, or its text in the GCS client's last error."""
    return any(type(e).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(e) for e in _causes(exc))


def prepare(config):
    """Connect to Ray and settle what depends on the cluster: ``--precision auto`` means mixed where the
    cluster (not the driver) has GPUs. Called once per extract, before any work."""
    import dataclasses

    resources = connect(config.ray_address)
    if config.precision == "auto":
        config = dataclasses.replace(config, precision="mixed" if resources.get("GPU", 0) > 0 else "float32")
    return config


def plan_shards(batches: list[tuple[str, list]], shard_rows: int) -> list[list[tuple[str, list]]]:
    """Consecutive planned batches, whole, until a shard holds at least ``shard_rows`` rows (as
    ``ShardPacker`` packs the local engine's batches)."""
    shards, current, rows = [], [], 0
    for batch in batches:
        current.append(batch)
        rows += len(batch[1])
        if rows >= shard_rows:
            shards.append(current)
            current, rows = [], 0
    if current:
        shards.append(current)
    return shards


def pool_resources(resources: dict, actors: int | None, decode: str | None = None) -> dict:
    """How the work is spread over a cluster with ``resources``.

    One actor per GPU with ``num_gpus=1`` where the cluster has GPUs, decoding in separate CPU tasks;
    otherwise ``--ray-actors`` CPU actors (default: one per two CPUs), where ``decode`` (``tasks`` or
    ``actor``; default ``DECODE_ON_CPU_CLUSTERS``) says where decoding runs: in Ray tasks of their own, or
    in the actor's process before the backbone (Ray Data fuses two map stages with equal resources). CPU actors and decode tasks share the CPUs (Ray's CPU counts are logical:
    they only bound how many run at once, so a decode task can always be scheduled).

    Returns:
        ``actors`` (pool size), ``actor`` (each actor's Ray resources), ``decode`` (where decoding runs)
        and ``decode_cpus`` (each decode task's CPUs).
    """
    cpus, gpus = float(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    if gpus > 0:  # the actors' num_gpus keeps Ray Data from fusing decoding into them
        n = actors or gpus
        return {"actors": n, "actor": {"num_gpus": 1, "num_cpus": min(1.0, cpus / (2 * n))},
                "decode": "tasks", "decode_cpus": 1.0}
    n = actors or max(1, int(cpus // 2))
    share = min(1.0, cpus / (2 * n))
    decode = decode or DECODE_ON_CPU_CLUSTERS
    # equal resources: Ray Data fuses the two stages (decoding in the actor); unequal: separate tasks
    return {"actors": n, "actor": {"num_cpus": share}, "decode": decode,
            "decode_cpus": share if decode == "actor" else share / 2}


def compute_shards(config, root: Path, spec, backbone, precision: str, missing: list, packer):
    """The Ray engine's ``compute.compute_batches``: compute ``missing`` rows into whole shard files.

    Args:
        config: the extract settings (``ray_actors`` read here).
        root: the data folder (the same path on every node: shared storage).
        spec, backbone, precision: the driver's backbone; its weights go to the actors.
        missing: ``(SourceFile, copy_index)`` rows to compute, in canonical order.
        packer: the cache's ``ShardPacker``: its shard folder, fingerprint, shard size and compression.

    Returns:
        ``(ComputeTiming, bad files)`` like the local engine.
    """
    from featcache.backbones import hash_weights
    from featcache.compute import ComputeTiming, plan_batches

    timing = ComputeTiming()
    if not missing:
        return timing, []
    ray = import_ray()
    resources = connect(config.ray_address)
    pool = pool_resources(resources, config.ray_actors)
    plan = plan_shards(plan_batches(missing, config.batch_size), packer.shard_rows)
    items = [{"shard": i, "batches": json.dumps([[[f.record.path, f.sha256, int(k)] for f, k in rows]
                                                 for _, rows in batches])}
             for i, batches in enumerate(plan)]
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False  # featcache's own bar instead
    weights = ray.put(backbone.get_weights())
    shards = packer.shards
    dataset = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(_decode, batch_size=1, fn_kwargs={"root": str(root), "config": config}, num_cpus=pool["decode_cpus"])
        .map_batches(ShardWriter, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(pool["actors"], len(items))),
                     **pool["actor"],
                     fn_constructor_kwargs={
                         "backbone": spec.name, "image_size": config.image_size, "seed": config.seed,
                         "mixed": precision == "mixed", "feature_layer": config.feature_layer, "weights": weights,
                         "weights_sha256": hash_weights(backbone), "folder": str(shards.folder),
                         "fingerprint": shards.fingerprint, "batch_size": config.batch_size, "dtype": config.dtype,
                         "compression": config.compression})
    )
    log.info("ray engine: %d shards over %d actors (%s each), decoding in the %s", len(items), pool["actors"],
             pool["actor"], "actors" if pool["decode"] == "actor" else f"tasks of {pool['decode_cpus']:.2g} CPU")
    bad: list[dict] = []
    started = time.perf_counter()
    bar = tqdm(total=len(missing), unit="img", desc=f"{spec.name} (ray)", disable=not config.progress,
               dynamic_ncols=True)
    try:
        for row in dataset.iter_rows():
            bad += json.loads(row["bad"])
            keys = [tuple(key) for key in json.loads(row["keys"])]
            if keys:
                shards.add(shards.folder / str(row["file"]), keys)
            if not timing.first_batch_rows:
                timing.first_batch_seconds, timing.first_batch_rows = time.perf_counter() - started, max(len(keys), 1)
            bar.update(int(row["planned"]))
    except Exception as exc:
        raise _featcache_cause(exc) or exc
    finally:
        bar.close()
    timing.seconds = time.perf_counter() - started
    return timing, bad


def _featcache_cause(exc: BaseException) -> FeatcacheError | None:
    """The FeatcacheError (storage, weights) an actor or task raised, unwrapped from Ray's exceptions."""
    return next((e for e in _causes(exc) if isinstance(e, FeatcacheError)), None)


def _causes(exc: BaseException | None):
    """``exc`` and what caused it, outermost first: Ray's wrapped ``cause``, else ``__cause__`` (each once)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__


def _decode(batch: dict, root: str, config) -> dict:
    """Ray task: decode and augment the images of one planned shard, batch by batch, exactly as the local
    engine's ``compute.prepare_batch`` does (it is that function); files that fail are reported, not raised."""
    from featcache.compute import prepare_batch

    planned = json.loads(batch["batches"][0])
    images, kept_batches, bad = [], [], []
    with cf.ThreadPoolExecutor(DECODE_THREADS) as pool:
        for rows in planned:
            rows = [(SimpleNamespace(record=SimpleNamespace(path=p), sha256=s), k) for p, s, k in rows]
            batch_images, kept, batch_bad = prepare_batch(Path(root), rows, config, pool)
            images += batch_images
            kept_batches.append([[f.record.path, f.sha256, k] for f, k in kept])
            bad += batch_bad
    size = config.image_size
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return {"images": stacked[None], "kept": np.array([json.dumps(kept_batches)]), "bad": np.array([json.dumps(bad)]),
            "planned": np.array([sum(len(rows) for rows in planned)])}


class ShardWriter:
    """Ray actor: builds the backbone once, then turns each decoded shard into a shard file."""

    def __init__(self, backbone: str, image_size: int, seed: int, mixed: bool, feature_layer: str | None,
                 weights: list, weights_sha256: str, folder: str, fingerprint: str, batch_size: int, dtype: str,
                 compression: str | None):
        from featcache.backbones import build_extractor, get_backbone_spec, hash_weights, load_backbone
        from featcache.compute import build_forward

        spec = get_backbone_spec(backbone)
        model = load_backbone(spec, image_size, "random", seed, mixed=mixed)  # the architecture; weights follow
        if not isinstance(weights, list):  # an ObjectRef: Ray Data hands constructor arguments over as they are
            import ray

            weights = ray.get(weights)
        model.set_weights(weights)
        if hash_weights(model) != weights_sha256:
            raise WeightsError(f"The Ray actor's {spec.name} weights differ from the driver's (hash "
                               f"{hash_weights(model)[:12]}). Received: weights_sha256={weights_sha256[:12]}")
        self.forward = build_forward(build_extractor(spec, model, image_size, feature_layer))
        self.folder, self.fingerprint = Path(folder), fingerprint
        self.batch_size, self.dtype, self.compression = batch_size, dtype, compression

    def __call__(self, batch: dict) -> dict:
        from featcache.compute import pad
        from featcache.shards import write_shard

        images, kept_batches = batch["images"][0], json.loads(batch["kept"][0])
        maps, pooled, keys, start = [], [], [], 0
        for kept in kept_batches:
            if not kept:
                continue
            batch_maps, batch_pooled = self.forward(pad(images[start:start + len(kept)], self.batch_size))
            maps.append(batch_maps[:len(kept)].astype(self.dtype))
            pooled.append(batch_pooled[:len(kept)])
            keys += [(p, s, int(k)) for p, s, k in kept]
            start += len(kept)
        name = ""
        if keys:
            name = write_shard(self.folder, self.fingerprint, np.concatenate(maps), np.concatenate(pooled), keys,
                               self.compression).name
        return {"file": np.array([name]), "keys": np.array([json.dumps(keys)]), "bad": batch["bad"],
                "planned": batch["planned"]}
