"""Grad-CAM (Selvaraju et al. 2017) of the head's decision, from feature maps: the cached ones, or the ones the
end-to-end model computes from a raw image. No backbone pass is needed for cached rows.

For maps ``A`` (h, w, c) and the head's logit ``y`` (the pre-sigmoid score of the positive class; for a
multi-class head the pre-softmax score ``z_k`` of the class explained, by default the predicted one)::

    alpha_k = mean over (i, j) of dy / dA[i, j, k]          (channel weights)
    cam[i, j] = relu(sum_k alpha_k * A[i, j, k])            (h, w) heatmap, in the units of y

The gradient is of the logit, not of the probability: the sigmoid's derivative p (1 - p) vanishes for a
confident head and would shrink the heatmap towards zero (float32 underflow at p = 1). Heatmaps are returned
raw; ``normalize`` scales one to [0, 1] for display.

Why not a library: the well-known Grad-CAM packages (tf-keras-vis, tf-explain) target tf.keras 2 and take a
whole model plus a convolution layer's name; here the input of the head *is* the convolution output, read
from the cache, and the arithmetic is the five lines of ``gradcam``. Tests check it against gradients taken
independently (through the pooled vector) and by finite differences.
"""

from __future__ import annotations

import numpy as np

from featcache.errors import FeatcacheError


def head_logit(head):
    """A function (n, h, w, c) float32 maps -> (n,) logits of a featcache head (its last layer is Dense(1, sigmoid)),
    or (n, k) logits of a multi-class head (Dense(k, softmax)).

    Raises:
        FeatcacheError: the head ends in neither a one-unit sigmoid nor a softmax Dense layer.
    """
    import keras

    last = head.layers[-1]
    softmax = is_softmax_head(head)
    if not softmax and (not isinstance(last, keras.layers.Dense) or last.units != 1
                        or last.activation is not keras.activations.sigmoid):
        raise FeatcacheError(f"Grad-CAM needs a head that ends in Dense(1, sigmoid) or Dense(k, softmax). Received: "
                             f"last layer {type(last).__name__}")
    hidden = keras.Model(head.input, head.layers[-2].output)

    def logit(maps):
        z = keras.ops.matmul(hidden(maps, training=False), last.kernel) + last.bias
        return z if softmax else keras.ops.squeeze(z, axis=-1)

    return logit


def is_softmax_head(head) -> bool:
    """Whether the head ends in Dense(k, softmax), k > 1 (a multi-class head)."""
    import keras

    last = head.layers[-1]
    return isinstance(last, keras.layers.Dense) and last.units > 1 and last.activation is keras.activations.softmax


def gradcam(head, maps: np.ndarray, batch_size: int = 64,
            target: int | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps and probabilities of ``head`` on ``maps``.

    Args:
        head: a featcache head (maps -> probability), e.g. ``EndToEnd.head``.
        maps: (n, h, w, c) feature maps, any float dtype (computed in float32).
        target: for a multi-class head, the class whose logit ``z_k`` the heatmap explains: one index for every
            image, (n,) indices, or None for each image's predicted class (the argmax). Unused for a binary head.

    Returns:
        (n, h, w) float32 heatmaps (raw, >= 0) and (n,) float32 probabilities of the positive class; for a
        multi-class head (n, k) probabilities of every class.
    """
    if is_softmax_head(head):
        return _gradcam_softmax(head, maps, batch_size, target)
    import tensorflow as tf

    logit = head_logit(head)
    cams, probs = [], []
    for start in range(0, len(maps), batch_size):
        batch = tf.convert_to_tensor(np.asarray(maps[start:start + batch_size], np.float32))
        with tf.GradientTape() as tape:
            tape.watch(batch)
            y = logit(batch)
        grads = tape.gradient(y, batch)  # (b, h, w, c)
        alpha = tf.reduce_mean(grads, axis=(1, 2))  # (b, c)
        cams.append(tf.nn.relu(tf.einsum("bhwc,bc->bhw", batch, alpha)).numpy())
        probs.append(tf.sigmoid(y).numpy())
    if not cams:
        return np.empty((0, *np.shape(maps)[1:3]), np.float32), np.empty((0,), np.float32)
    return np.concatenate(cams).astype(np.float32), np.concatenate(probs).astype(np.float32)


def _gradcam_softmax(head, maps: np.ndarray, batch_size: int, target) -> tuple[np.ndarray, np.ndarray]:
    """``gradcam`` of a multi-class head: the gradient of the chosen class's logit ``z_k`` (not of its softmax
    probability, which depends on every other logit and saturates). Each image's logits depend on its own maps
    alone (inference mode), so the gradient of the batch's sum of chosen logits is each image's own."""
    import tensorflow as tf

    logit = head_logit(head)
    targets = None if target is None else np.broadcast_to(np.asarray(target, np.int64), (len(maps),))
    cams, probs = [], []
    for start in range(0, len(maps), batch_size):
        batch = tf.convert_to_tensor(np.asarray(maps[start:start + batch_size], np.float32))
        with tf.GradientTape() as tape:
            tape.watch(batch)
            z = logit(batch)  # (b, k)
            chosen = tf.argmax(z, axis=1) if targets is None else tf.constant(targets[start:start + batch_size])
            y = tf.reduce_sum(tf.gather(z, chosen, axis=1, batch_dims=1))
        grads = tape.gradient(y, batch)
        alpha = tf.reduce_mean(grads, axis=(1, 2))
        cams.append(tf.nn.relu(tf.einsum("bhwc,bc->bhw", batch, alpha)).numpy())
        probs.append(tf.nn.softmax(z).numpy())
    if not cams:
        classes = int(head.output_shape[-1])
        return np.empty((0, *np.shape(maps)[1:3]), np.float32), np.empty((0, classes), np.float32)
    return np.concatenate(cams).astype(np.float32), np.concatenate(probs).astype(np.float32)


def end_to_end_maps(model, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """The maps the reassembled (or exported) end-to-end model feeds its head: (n, s, s, 3) uint8 -> (n, h, w, c).

    The model is image -> preprocessing layers -> backbone -> head (``assemble.assemble_model``); its layers
    between the input and the head are applied in order, in inference mode.
    """
    outputs = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        for layer in model.layers[1:-1]:
            x = layer(x, training=False)
        outputs.append(np.asarray(x, np.float32))
    return np.concatenate(outputs) if outputs else np.empty((0,), np.float32)


def normalize(cam: np.ndarray) -> np.ndarray:
    """One heatmap scaled to [0, 1] by its maximum (an all-zero heatmap stays zero)."""
    top = float(np.max(cam)) if cam.size else 0.0
    return (cam / top).astype(np.float32) if top > 0 else np.zeros_like(cam, np.float32)


def upsample(cam: np.ndarray, size: int) -> np.ndarray:
    """(h, w) -> (size, size), bilinear (half-pixel centres), for an overlay on the (size, size) image."""
    import tensorflow as tf

    return tf.image.resize(cam[..., None].astype(np.float32), (size, size), method="bilinear").numpy()[..., 0]
