"""Every GPU of one machine for the local engine: one backbone replica per device, whole batches dealt out.

``make_forward(extractor, devices)`` returns a ``Forward``: ``forward(images) -> (maps, pooled)`` and
``forward.submit(images) -> Future``. With one device (or none named: TensorFlow's default placement) it is one
compiled step run in the caller's thread, as before. With several it copies the extractor onto each device (its
own weights there), compiles one step per device, and deals whole batches to the replicas in turn, each from
its own thread (TensorFlow releases the GIL while a step runs), so N devices have N batches in flight.

Whole batches, not slices of one: every replica sees the batch shape of a single device (``extract`` pads short
batches), so it runs the same kernels and a row's features are bit for bit those of one device. Cutting a
batch in two changes the matrix shapes, and with them the summation order: on a CPU that moved float32 maps by
one unit in the last place (measured with the tiny backbone at 32 px).

Which devices: ``replica_devices()`` lists the logical GPUs when there are two or more; a machine with one GPU
or none runs one replica. The Ray engine (``--engine ray``) is the way to use several machines.
"""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np


def replica_devices() -> list[str]:
    """The logical GPUs, when there are at least two; else [] (one replica, default placement)."""
    import tensorflow as tf

    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    return gpus if len(gpus) > 1 else []


class Forward:
    """``images -> (maps, pooled)`` on one or several replicas (``make_forward``)."""

    def __init__(self, steps: list):
        import tensorflow as tf

        self._tf, self._steps, self._next = tf, steps, 0
        self.replicas = len(steps)
        self._pools = [cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"featcache-replica{i}")
                       for i in range(len(steps))] if len(steps) > 1 else []

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.submit(images).result()

    def submit(self, images: np.ndarray) -> cf.Future:
        """Start one batch on the next replica; with one replica it runs now, in this thread."""
        i, self._next = self._next, (self._next + 1) % len(self._steps)
        if not self._pools:
            future: cf.Future = cf.Future()
            future.set_result(self._run(*self._steps[i], images))
            return future
        return self._pools[i].submit(self._run, *self._steps[i], images)

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown()

    def _run(self, device, step, images):
        tf = self._tf
        if device is None:
            return tuple(t.numpy() for t in step(tf.convert_to_tensor(images)))
        with tf.device(device):
            return tuple(t.numpy() for t in step(tf.convert_to_tensor(images)))


def make_forward(extractor, devices: list[str] | None = None) -> Forward:
    """A compiled ``images -> (maps, pooled)`` (float32 numpy); pooled is averaged from float32 maps.

    The extractor's dtype policy (float32 or mixed_float16) was set when its backbone was built; XLA compiles
    each step where a GPU is visible.

    Args:
        extractor: uint8 images -> feature maps (``backbones.build_extractor``).
        devices: TensorFlow device names, one replica each; None or one device: a single replica.
    """
    import tensorflow as tf

    use_xla = bool(tf.config.list_physical_devices("GPU"))
    if not devices or len(devices) == 1:
        return Forward([(None, _compiled_step(extractor, use_xla))])
    steps = []
    for device in devices:
        with tf.device(device):
            steps.append((device, _compiled_step(_replica(extractor, device), use_xla)))
    return Forward(steps)


def _compiled_step(extractor, use_xla: bool):
    import tensorflow as tf

    @tf.function(jit_compile=use_xla)
    def step(images):
        maps = tf.cast(extractor(images, training=False), tf.float32)
        return maps, tf.reduce_mean(maps, axis=(1, 2))

    return step


def _replica(extractor, device: str):
    """A copy of ``extractor`` whose variables live on ``device``."""
    import keras
    import tensorflow as tf

    with tf.device(device):
        replica = keras.models.clone_model(extractor)
        replica.set_weights(extractor.get_weights())
    replica.trainable = False
    return replica
