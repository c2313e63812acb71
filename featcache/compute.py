"""Backbone batches: plan them, decode and augment them ahead in threads, run the forward pass, hand each
finished batch to the packer (``partial.ShardPacker``). The local engine; ``ray_engine`` reuses its pieces.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from featcache.augment import augment_copies
from featcache.config import ExtractConfig
from featcache.decode import load_image
from featcache.errors import DataError, FeatcacheError, ImageTooLargeError
from featcache.partial import ShardPacker
from featcache.replicas import make_forward, replica_devices


def plan_batches(missing: list, batch_size: int) -> list[tuple[str, list]]:
    """Fixed batches in canonical order; the id hashes the rows, so a resumed run finds them again."""
    batches = []
    for start in range(0, len(missing), batch_size):
        rows = missing[start:start + batch_size]
        key = "\n".join(f"{f.record.path}|{f.sha256}|{k}" for f, k in rows)
        batches.append((hashlib.sha256(key.encode()).hexdigest()[:20], rows))
    return batches


def prepare_batch(root: Path, rows: list, config: ExtractConfig, pool: cf.Executor):
    """Decode and augment the images of one batch; files that fail to decode are dropped and reported."""
    by_file: dict[str, list] = {}
    for f, k in rows:
        by_file.setdefault(f.record.path, []).append((f, k))

    def load(group):
        f = group[0][0]
        try:
            image = load_image(root / f.record.path, config.image_size, config.max_pixels, config.decode == "fast")
        except DataError as exc:
            return f, None, exc
        copies = [k for _, k in group if k > 0]
        augmented = iter(augment_copies(image, copies, config.seed, f.sha256, config.augment) if copies else [])
        return f, [image if k == 0 else next(augmented) for _, k in group], None

    images, kept, bad = [], [], []
    for (f, copies, error), group in zip(pool.map(load, by_file.values()), by_file.values()):
        if error:
            pixels = {"pixels": error.pixels} if isinstance(error, ImageTooLargeError) else {}
            bad.append({"path": f.record.path, "sha256": f.sha256, "error": str(error), **pixels})
            continue
        images.extend(copies)
        kept.extend(group)
    return images, kept, bad


@dataclass
class ComputeTiming:
    """Seconds of the backbone phase; the first batch also pays the trace and graph optimisation."""

    seconds: float = 0.0
    first_batch_seconds: float = 0.0
    first_batch_rows: int = 0

    def rate(self, rows: int) -> float:
        return rows / self.seconds if self.seconds > 0 else 0.0

    def steady_rate(self, rows: int) -> float:
        """Rows per second after the first batch (the one-time trace excluded)."""
        rest = self.seconds - self.first_batch_seconds
        return (rows - self.first_batch_rows) / rest if rest > 0 and rows > self.first_batch_rows else 0.0


def compute_batches(config, root, extractor, missing, store: ShardPacker) -> tuple[ComputeTiming, list[dict]]:
    """Run the backbone over the missing rows; each finished batch goes to ``store`` (which packs shards)."""
    timing = ComputeTiming()
    if not missing:
        return timing, []
    forward = build_forward(extractor)
    batches = plan_batches(missing, config.batch_size)
    prepared: queue.Queue = queue.Queue(maxsize=max(2, forward.replicas + 1))
    stop = threading.Event()
    failed: list[BaseException] = []
    bad: list[dict] = []
    producer = threading.Thread(target=_produce, args=(batches, root, config, prepared, stop, failed), daemon=True,
                                name="featcache-decode")
    producer.start()
    started = time.perf_counter()
    bar = tqdm(total=len(missing), unit="img", desc=extractor.name.replace("_extractor", ""),
               disable=not config.progress, dynamic_ncols=True)
    try:
        with cf.ThreadPoolExecutor(max_workers=1) as writer:
            pending: list[cf.Future] = []
            computing: collections.deque = collections.deque()  # (future, batch_id, kept, failed): one per replica

            def finish(future, batch_id, kept, failed):
                if future is None:  # every file of the batch failed: its planned rows still count for the shard
                    pending.append(writer.submit(store.note_failed, failed))
                    return
                maps, pooled = future.result()
                maps, pooled = maps[:len(kept)], pooled[:len(kept)]
                if not timing.first_batch_rows:
                    timing.first_batch_seconds, timing.first_batch_rows = time.perf_counter() - started, len(kept)
                pending.append(writer.submit(
                    store.write, batch_id, maps.astype(config.dtype), pooled,
                    [f.record.path for f, _ in kept], [f.sha256 for f, _ in kept], np.array([k for _, k in kept]),
                    failed,
                ))

            while (item := prepared.get()) is not None:
                batch_id, planned, images, kept, batch_bad = item
                bad.extend(batch_bad)
                future = forward.submit(pad(np.stack(images), config.batch_size)) if kept else None
                computing.append((future, batch_id, kept, planned - len(kept)))  # finished in batch order
                while computing and (len(computing) >= forward.replicas or computing[0][0] is None
                                     or computing[0][0].done()):
                    finish(*computing.popleft())  # in batch order
                for done in [p for p in pending if p.done()] + pending[:-2]:
                    done.result()  # surface write errors; keep at most two writes in flight
                pending = [p for p in pending if not p.done()]
                bar.update(planned)
            while computing:
                finish(*computing.popleft())
            for p in pending:
                p.result()
        if failed:
            raise failed[0]
    except Exception as exc:
        if _is_out_of_memory(exc):
            raise FeatcacheError(
                f"Out of memory at --image-size {config.image_size} with --batch-size {config.batch_size}; use a "
                f"smaller --image-size or --batch-size. Received: image_size={config.image_size}, "
                f"batch_size={config.batch_size}"
            ) from None
        raise
    finally:
        stop.set()
        bar.close()
        forward.close()
        producer.join(timeout=10)  # it stops after its current batch
    timing.seconds = time.perf_counter() - started
    return timing, bad


def _produce(batches, root, config, prepared: queue.Queue, stop: threading.Event, failed: list) -> None:
    """Decode and augment batch after batch into ``prepared``, then put the end marker (None).

    Whatever happens, the consumer gets its end marker: a producer that died silently left extract
    waiting forever. An exception is handed over in ``failed``, for the consumer to re-raise.
    """
    try:
        with cf.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
            for batch_id, rows in batches:
                if stop.is_set():
                    return
                _put(prepared, (batch_id, len(rows), *prepare_batch(root, rows, config, pool)), stop)
    except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
        failed.append(exc)
    finally:
        _put(prepared, None, stop)


def _put(prepared: queue.Queue, item, stop: threading.Event) -> None:
    """Hand ``item`` to the consumer, unless it has stopped listening."""
    while not stop.is_set():
        try:
            prepared.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _is_out_of_memory(exc: BaseException) -> bool:
    import tensorflow as tf

    return isinstance(exc, (MemoryError, tf.errors.ResourceExhaustedError))


def pad(images: np.ndarray, batch_size: int) -> np.ndarray:
    """Pad a short batch with blank images: one input shape means one trace (and one XLA compile), and
    a row's features never depend on how full its batch was."""
    if len(images) == batch_size:
        return images
    blank = np.zeros((batch_size - len(images), *images.shape[1:]), images.dtype)
    return np.concatenate([images, blank])


def build_forward(extractor):
    """A compiled ``images -> (maps, pooled)``: one backbone replica per visible GPU (``replicas``)."""
    return make_forward(extractor, replica_devices())
