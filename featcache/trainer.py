"""Training a head on cached pooled vectors: one traced epoch of optimizer steps (``_Trainer``, fused Adam on
tf.Variables) and the epoch loop with early stopping and best-weight restore (``fit_epochs``), shared by the
binary head (``head.fit_head``), the softmax head (``multiclass``) and the multi-label head (``multilabel``):
a ``HeadTask`` says what differs (the loss, via the trainer; the prediction graph; the scores).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from featcache.head import (
    ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON, VAL_BATCH_ROWS, FitResult, HeadModels, HeadParams, TrainViews,
    epoch_windows, score_probs,
)


@dataclass(frozen=True)
class HeadTask:
    """What differs between the binary, softmax and multi-label heads in ``fit_epochs``.

    Attributes:
        trainer: head weight shapes -> its ``_Trainer`` (cached per process).
        predict: () -> ``predict(weights, x)`` graph of the validation probabilities.
        score: (labels, probs) -> scores, with ``loss`` (unweighted) and ``roc_auc``.
    """

    trainer: Callable
    predict: Callable
    score: Callable


def fit_epochs(models: HeadModels, task: HeadTask, train: TrainViews, y_all: np.ndarray, w_all: np.ndarray,
               val_pooled, val_labels, val_weights: np.ndarray, stop_loss: Callable | None, params: HeadParams, *,
               seed: int, max_epochs: int, patience: int, on_epoch: Callable[[int, dict], bool] | None) -> FitResult:
    """The epochs of every head: ``fit_head``'s loop for a ``task``, with per-row targets ``y_all`` and loss
    weights ``w_all`` of ``train``'s rows; early stopping on ``stop_loss(val_labels, probs, val_weights)`` (the
    weighted validation loss), or on the task's unweighted ``loss`` score when it is None."""
    import tensorflow as tf

    trainer = task.trainer(tuple(tuple(v.shape) for v in models.pooled.trainable_variables))
    trainer.reset([v.numpy() for v in models.pooled.trainable_variables])
    hyper = [tf.constant(v, dtype) for v, dtype in ((params.batch_size, tf.int32), (params.learning_rate, tf.float32),
                                                    (params.l2, tf.float32), (params.dropout, tf.float32),
                                                    (seed, tf.int64))]
    standardize = models.standardize or (lambda x: x)  # the layer itself: training sees what the saved head computes
    x_all = None if train.pooled is None else standardize(tf.convert_to_tensor(train.pooled, tf.float32))
    score = _val_scorer(val_pooled, standardize, task.predict())
    rng = np.random.default_rng(seed)
    best_loss, best_epoch, best, history, stopped = np.inf, 0, trainer.weights_now(), [], False
    for epoch in range(1, max_epochs + 1):
        windows = epoch_windows(train.source_index, params.batch_size, rng, train.layout)
        if x_all is not None:  # one graph call for the whole epoch
            rows = np.concatenate([rows for _, rows in windows])
            trainer.epoch(x_all, tf.constant(y_all), tf.constant(w_all), tf.constant(rows), *hyper)
        else:
            _train_streamed(trainer.epoch, train.stream(windows), windows, y_all, w_all, standardize, hyper)
        weights = trainer.weights_now()
        probs = score(weights)
        scores = task.score(val_labels, probs)
        loss = stop_loss(val_labels, probs, val_weights) if stop_loss else scores["loss"]
        history.append({"epoch": epoch, **scores, "stop_loss": loss})
        if loss < best_loss:
            best_loss, best_epoch, best = loss, epoch, weights
        stopped = bool(on_epoch(epoch, scores)) if on_epoch else False
        if stopped or epoch - best_epoch >= patience:
            break
    for variable, value in zip(models.pooled.trainable_variables, best):
        variable.assign(value)
    probs = score(best)
    return FitResult(task.score(val_labels, probs), probs, best_epoch, epoch, stopped, history)


def _train_streamed(train_epoch, views, windows, y_all, w_all, standardize, hyper) -> None:
    """One epoch on views that arrive a window at a time: the rows left over from a window's last full batch
    open the next window's first, so the batches are exactly those of the epoch trained in one call."""
    import tensorflow as tf

    batch_size = int(hyper[0].numpy())
    carry_x, carry_rows = None, np.empty(0, np.int32)
    for x, (_, rows) in zip(views, windows, strict=True):  # views first: its generator runs to its end (closes)
        x = standardize(tf.convert_to_tensor(x, tf.float32))
        if len(carry_rows):
            x, rows = tf.concat([carry_x, x], 0), np.concatenate([carry_rows, rows])
        full = len(rows) // batch_size * batch_size
        if full:
            train_epoch(x, tf.constant(y_all[rows]), tf.constant(w_all[rows]), tf.range(full, dtype=tf.int32), *hyper)
        carry_x, carry_rows = x[full:], rows[full:]
    if len(carry_rows):
        train_epoch(carry_x, tf.constant(y_all[carry_rows]), tf.constant(w_all[carry_rows]),
                    tf.range(len(carry_rows), dtype=tf.int32), *hyper)


def _val_scorer(val_pooled, standardize, predict) -> Callable:
    """``score(weights) -> (m,) probabilities`` of the validation rows, ``VAL_BATCH_ROWS`` at a time.

    ``val_pooled`` is an (m, c) array, standardized once here, or an object whose ``batches()`` yields the rows
    in batches of ``VAL_BATCH_ROWS`` (read from the cache on every call). Either way each batch is the same,
    so the probabilities are too.
    """
    import tensorflow as tf

    if hasattr(val_pooled, "batches"):
        return lambda weights: np.concatenate([
            predict(weights, standardize(tf.convert_to_tensor(batch, tf.float32))).numpy()
            for batch in val_pooled.batches()])
    held = [standardize(tf.convert_to_tensor(val_pooled[start:start + VAL_BATCH_ROWS], tf.float32))
            for start in range(0, len(val_pooled), VAL_BATCH_ROWS)]
    return lambda weights: np.concatenate([predict(weights, batch).numpy() for batch in held])


def _class_logits(weights, x, rate=None, seed=None):
    """The head on pooled vectors: Dense(units, relu) -> [Dropout(rate), stateless] -> Dense(k) logits, (n, k)."""
    import tensorflow as tf

    kernel, bias, out_kernel, out_bias = weights
    hidden = tf.nn.relu(tf.matmul(x, kernel) + bias)
    if rate is not None:  # inverted dropout, as keras.layers.Dropout
        keep = tf.random.stateless_uniform(tf.shape(hidden), seed=seed) >= rate
        hidden = tf.where(keep, hidden / (1.0 - rate), tf.zeros_like(hidden))
    return tf.matmul(hidden, out_kernel) + out_bias


def _logits(weights, x, rate=None, seed=None):
    """``_class_logits`` of the binary head's one output, (n,)."""
    return _class_logits(weights, x, rate, seed)[:, 0]


@functools.cache
def class_predict_graph(link: str):
    """``predict(weights, x) -> (n, k) probabilities`` of a k-output head as a tf.function with a fixed
    signature, traced once per ``link``: "softmax" (one class of k) or "sigmoid" (each label on its own)."""
    import tensorflow as tf

    apply = {"softmax": tf.nn.softmax, "sigmoid": tf.sigmoid}[link]
    vector, matrix = tf.TensorSpec([None], tf.float32), tf.TensorSpec([None, None], tf.float32)
    return tf.function(lambda weights, x: apply(_class_logits(weights, x)),
                       input_signature=[(matrix, vector, matrix, vector), matrix])


@functools.cache
def _predict_graph():
    """``predict(weights, x) -> probabilities`` as a tf.function with a fixed signature: traced once."""
    import tensorflow as tf

    vector, matrix = tf.TensorSpec([None], tf.float32), tf.TensorSpec([None, None], tf.float32)
    return tf.function(lambda weights, x: tf.sigmoid(_logits(weights, x)),
                       input_signature=[(matrix, vector, matrix, vector), matrix])


class _Trainer:
    """The weights and Adam moments of one head size as tf.Variables, and ``epoch``: a traced graph that runs
    an epoch's optimizer steps in one call.

    The update is TensorFlow's fused Adam kernel (``ResourceApplyAdam``): Keras's Adam arithmetic (bias-corrected
    step size, ``m += (g - m)(1 - beta_1)``, ``v += (g^2 - v)(1 - beta_2)``, ``w -= lr_t m / (sqrt(v) + eps)``) in
    one pass over each weight instead of a dozen elementwise ops, which made up about a third of an epoch.
    One trainer per head size per process (``_trainer``), traced once and reset by each fit; not re-entrant.
    Subclasses change the loss alone (``_batch_loss``; ``TARGET_RANK`` 2 for (n, k) targets and loss weights).
    """

    TARGET_RANK = 1

    def __init__(self, shapes: tuple[tuple[int, ...], ...]):
        import tensorflow as tf

        self.weights = [tf.Variable(tf.zeros(shape), trainable=False) for shape in shapes]
        self.moments = [(tf.Variable(tf.zeros(shape), trainable=False), tf.Variable(tf.zeros(shape), trainable=False))
                        for shape in shapes]
        self.steps = tf.Variable(0, dtype=tf.int64, trainable=False)
        scalar, target = tf.TensorSpec([], tf.float32), tf.TensorSpec([None] * self.TARGET_RANK, tf.float32)
        self.epoch = tf.function(self._epoch, input_signature=[
            tf.TensorSpec([None, None], tf.float32), target, target, tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([], tf.int32), scalar, scalar, scalar, tf.TensorSpec([], tf.int64)])

    def reset(self, weights: list[np.ndarray]) -> None:
        """Start from these weights with fresh Adam moments and step count."""
        for variable, value, (m, v) in zip(self.weights, weights, self.moments):
            variable.assign(value)
            m.assign(np.zeros_like(value))
            v.assign(np.zeros_like(value))
        self.steps.assign(0)

    def weights_now(self) -> tuple:
        """A snapshot of the weights (tensors that later updates do not change)."""
        import tensorflow as tf

        return tuple(tf.identity(variable.read_value()) for variable in self.weights)

    def _batch_loss(self, weights, x, y, w, rate, seed):
        """BinaryCrossentropy (on the sigmoid's logits, as Keras does) with sample weights, mean over the batch."""
        import tensorflow as tf

        z = _logits(weights, x, rate, seed)
        loss = tf.reduce_sum(w * tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=z))
        return loss / tf.cast(tf.size(y), tf.float32)

    def _epoch(self, x_all, y_all, w_all, rows, batch_size, learning_rate, l2, rate, seed):
        import tensorflow as tf

        n_batches = (tf.size(rows) + batch_size - 1) // batch_size

        def step(i):
            batch = rows[i * batch_size:(i + 1) * batch_size]
            x, y, w = tf.gather(x_all, batch), tf.gather(y_all, batch), tf.gather(w_all, batch)
            t = self.steps.read_value()
            weights = [variable.read_value() for variable in self.weights]
            with tf.GradientTape() as tape:
                tape.watch(weights)
                loss = self._batch_loss(weights, x, y, w, rate, tf.stack([seed, t]))
                loss += l2 * (tf.reduce_sum(tf.square(weights[0])) + tf.reduce_sum(tf.square(weights[2])))
            grads = tape.gradient(loss, weights)
            t = t + 1  # keras.optimizers.Adam defaults: beta_1 0.9, beta_2 0.999, epsilon 1e-7
            updates = [tf.raw_ops.ResourceApplyAdam(
                var=variable.handle, m=m.handle, v=v.handle, beta1_power=ADAM_BETA_1 ** tf.cast(t, tf.float32),
                beta2_power=ADAM_BETA_2 ** tf.cast(t, tf.float32), lr=learning_rate, beta1=ADAM_BETA_1,
                beta2=ADAM_BETA_2, epsilon=ADAM_EPSILON, grad=grad)
                for variable, (m, v), grad in zip(self.weights, self.moments, grads)]
            with tf.control_dependencies(updates + [self.steps.assign(t)]):
                return (tf.identity(i + 1),)  # the next step starts after this one's updates

        tf.while_loop(lambda i: i < n_batches, step, (tf.constant(0),))
        return self.steps.read_value()


@functools.cache
def _trainer(shapes: tuple[tuple[int, ...], ...]) -> _Trainer:
    return _Trainer(shapes)


BINARY_TASK = HeadTask(trainer=lambda shapes: _trainer(shapes), predict=lambda: _predict_graph(),
                       score=lambda labels, probs: score_probs(labels, probs))
