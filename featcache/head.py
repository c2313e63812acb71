"""The reference head (GAP -> [Normalization] -> Dense -> Dropout -> Dense sigmoid), its training on
cached pooled vectors, and the validation scores that drive early stopping, pruning and the threshold.

Global average pooling has no parameters, so ``dense(mean(maps))`` trained on the cached pooled
vectors is the very function ``head(maps)``: the two models here share their layers. The optional
standardization is a per-channel affine map, which commutes with the average, so it too can sit
after the pooling and be applied to the cached pooled vectors. The training loop itself is ``trainer``'s.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from featcache.errors import FeatcacheError

log = logging.getLogger(__name__)

EPSILON = 1e-7  # probability clip of the validation loss, as keras.losses.BinaryCrossentropy
# An epoch makes at least this many optimizer steps: one pass over the training images, or as few
# passes as that takes on a small training set. One pass of more than 7 x 512 = 3,584 images (512 is
# the largest batch searched) already makes 8 steps, so on the full Kermany training split (about
# 4,185 images) every epoch is exactly one pass, as in the reference loop.
MIN_STEPS_PER_EPOCH = 8
ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-7  # keras.optimizers.Adam defaults
VAL_BATCH_ROWS = 8192  # validation rows scored at a time, whether they are held in memory or streamed
STATS_CHUNK_ROWS = 8192  # rows per partial fit of the standardization statistics


@dataclass(frozen=True)
class HeadParams:
    """Hyperparameters of one head. The defaults are the reference head (128 units)."""

    units: int = 128
    dropout: float = 0.5
    learning_rate: float = 1e-3
    batch_size: int = 64
    l2: float = 0.0
    class_weight: bool = False
    standardize: bool = False  # a Normalization layer (training-view mean and variance) before the first Dense

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HeadModels:
    """Two views of one head, sharing every weight.

    Attributes:
        maps: (n, h, w, c) feature maps -> (n, 1) probability; what is saved and exported.
        pooled: (n, c) pooled vectors -> (n, 1) probability; what is trained.
    """

    maps: "keras.Model"  # noqa: F821
    pooled: "keras.Model"  # noqa: F821
    standardize: "keras.layers.Normalization | None" = None  # noqa: F821


@dataclass(frozen=True)
class InputStats:
    """Per-channel mean and variance of the training views' pooled vectors (float32, shape (c,)).

    ``variance`` is 1 where a channel is constant on the training views (scikit-learn's StandardScaler
    rule), so such a channel is centred but not blown up by a division by ~0.
    """

    mean: np.ndarray
    variance: np.ndarray


@dataclass(frozen=True)
class EpochLayout:
    """How the training views of an epoch are grouped so that they can be read from the cache in order.

    The rows of the cache file are cut into blocks of ``block_rows`` (the /pooled HDF5 chunk); an epoch visits
    the blocks in a random order, ``window_blocks`` at a time, and shuffles the views drawn from the blocks of
    one window (``epoch_windows``). The layout depends on the cache alone, never on the memory budget, so the
    views held in memory and the views streamed from the file make the same epochs.

    Attributes:
        file_rows: (n,) increasing row in the cache file of each training view.
        block_rows: rows per block.
        window_blocks: blocks per shuffle window.
    """

    file_rows: np.ndarray
    block_rows: int
    window_blocks: int


@dataclass(frozen=True)
class TrainViews:
    """Training rows: several views (original + augmented copies) of each training image.

    Attributes:
        pooled: (n, c) float32 pooled vectors (or a tf.Tensor); None when they are streamed (``stream``).
        labels: (n,) 0/1.
        source_index: (n,) the image each row is a view of.
        layout: the epochs' shuffle windows; None: one window (a shuffle of every view drawn).
        stream: with ``pooled`` None, ``stream(windows)`` yields each window's views, (len(rows), c) float32,
            in the order of ``epoch_windows``'s rows.
    """

    pooled: np.ndarray | None
    labels: np.ndarray
    source_index: np.ndarray
    layout: EpochLayout | None = None
    stream: Callable | None = None


@dataclass
class FitResult:
    """Outcome of ``fit_head``; ``scores`` and ``probs`` are at the restored (best) weights."""

    scores: dict
    probs: np.ndarray
    best_epoch: int
    epochs: int
    stopped: bool  # the ``on_epoch`` callback asked to stop (pruning)
    history: list[dict] = field(default_factory=list)


def build_head(feature_shape: tuple[int, int, int], params: HeadParams, stats: InputStats | None = None,
               classes: int = 2, multilabel: bool = False) -> HeadModels:
    """The reference head on (h, w, c) maps and its pooled twin; seed with keras.utils.set_random_seed first.

    With ``units=128`` it has 65,793 trainable parameters on VGG16 maps (c=512) and 262,401 on
    ResNet152 maps (c=2048). L2 (``params.l2`` > 0) applies to both Dense kernels. With
    ``params.standardize`` a ``keras.layers.Normalization`` holding ``stats`` (no trainable
    parameters; plain Keras, loads in safe mode) sits between the pooling and the first Dense.

    Args:
        feature_shape: (h, w, c) of the backbone's maps.
        params: units, dropout rate, L2 and standardization of the layers.
        stats: the training views' channel statistics; required when ``params.standardize``.
        classes: 2 gives the reference Dense(1, sigmoid) output; more give Dense(classes, softmax)
            (``featcache.multiclass``).
        multilabel: Dense(classes, sigmoid), one independent probability per label (``featcache.multilabel``).

    Returns:
        HeadModels whose ``maps`` and ``pooled`` models share the same layers.

    Raises:
        FeatcacheError: ``params.standardize`` without ``stats`` of ``feature_shape[-1]`` channels.
    """
    import keras

    standardize = None
    if params.standardize:
        if stats is None or stats.mean.shape != (feature_shape[-1],):
            raise FeatcacheError(f"A standardized head needs the mean and variance of its {feature_shape[-1]} input "
                                 f"channels. Received: stats={None if stats is None else stats.mean.shape}")
        standardize = keras.layers.Normalization(mean=stats.mean, variance=stats.variance, name="head_standardize")
    regularizer = keras.regularizers.L2(params.l2) if params.l2 > 0 else None
    dense = keras.layers.Dense(params.units, activation="relu", kernel_regularizer=regularizer, name="head_dense")
    dropout = keras.layers.Dropout(params.dropout, name="head_dropout")
    units, activation = (classes, "sigmoid") if multilabel else (1, "sigmoid") if classes <= 2 else (classes, "softmax")
    output = keras.layers.Dense(units, activation=activation, kernel_regularizer=regularizer, name="head_output")

    def top(x):
        return output(dropout(dense(standardize(x) if standardize is not None else x)))

    maps_in = keras.Input(tuple(feature_shape), name="features")
    maps = keras.Model(maps_in, top(keras.layers.GlobalAveragePooling2D(name="head_pool")(maps_in)), name="head")
    pooled_in = keras.Input((feature_shape[-1],), name="pooled")
    return HeadModels(maps=maps, pooled=keras.Model(pooled_in, top(pooled_in), name="head_pooled"),
                      standardize=standardize)


def input_stats(pooled: np.ndarray, chunk_rows: int = STATS_CHUNK_ROWS) -> InputStats:
    """Channel mean and variance of pooled vectors, accumulated in float64 over row chunks.

    Args:
        pooled: (n, c) pooled vectors of the training views (never validation or test rows).
        chunk_rows: rows per partial fit; memory is O(chunk_rows * c), whatever n.

    Returns:
        InputStats, with the variance of constant channels set to 1 (as StandardScaler's scale).
    """
    return input_stats_of_chunks(pooled[start:start + chunk_rows] for start in range(0, len(pooled), chunk_rows))


def input_stats_of_chunks(chunks) -> InputStats:
    """``input_stats`` of rows that arrive a chunk at a time (read from the cache in one pass): StandardScaler's
    float64 partial fits, merged with Chan et al.'s update. The same chunks give the same bits as ``input_stats``.
    """
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    for chunk in chunks:
        scaler.partial_fit(np.asarray(chunk, dtype=np.float64))
    return InputStats(scaler.mean_.astype(np.float32), np.square(scaler.scale_).astype(np.float32))


def sample_views(source_index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One row per image, drawn uniformly among its views, in shuffled order: one epoch.

    Args:
        source_index: (n,) image of each row.
        rng: numpy generator, advanced in place.

    Returns:
        (m,) int32 row indices, m = number of distinct images.
    """
    return rng.permutation(pick_views(source_index, rng)).astype(np.int32)


def pick_views(source_index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One row per image, drawn uniformly among its views (one ``rng.random`` draw per image), by image."""
    order = np.argsort(source_index, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(source_index[order]) != 0])
    counts = np.diff(np.r_[starts, len(order)])
    return order[starts + (rng.random(len(starts)) * counts).astype(np.int64)]


def epoch_rows(source_index: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """The rows of one epoch: ``sample_views`` passes until they make ``MIN_STEPS_PER_EPOCH`` batches.

    With a few hundred training images an epoch of one pass is one to four optimizer steps, and early
    stopping, its patience and the pruner, all counted in epochs, would judge a head after a handful of
    steps: most trials would end before they learned anything. So an epoch has at least
    ``MIN_STEPS_PER_EPOCH`` steps; on a training set of more than ``7 * batch_size`` images it is one pass.

    Returns:
        (passes * images,) int32 rows, each pass one view per image in a fresh order.
    """
    return np.concatenate([rows for _, rows in epoch_windows(source_index, batch_size, rng)])


def epoch_windows(source_index: np.ndarray, batch_size: int, rng: np.random.Generator,
                  layout: EpochLayout | None = None) -> list[tuple[np.ndarray | None, np.ndarray]]:
    """The rows of one epoch (``epoch_rows``), window by window, for reading them from the cache in order.

    Each pass draws one view per image (``pick_views``). When the views drawn lie in at most
    ``layout.window_blocks`` blocks (or without a layout) the pass is one window, shuffled as a whole: exactly
    ``sample_views``. Otherwise the blocks are dealt into as few windows of at most ``window_blocks`` blocks
    as hold them, stratified (each run of consecutive blocks gives one block to every window, at random),
    the windows are visited in a random order, and the views drawn from a window's blocks are shuffled
    together. Batches then mix views from the whole length of the file, whose rows are ordered by file
    path, hence by class.

    Returns:
        [(blocks, rows)]: the window's blocks (increasing; None without a layout) and its training rows, in the
        order they are trained.
    """
    images = len(np.unique(source_index))
    passes = (MIN_STEPS_PER_EPOCH - 1) * batch_size // images + 1  # the fewest with ceil(passes * images / batch) >= 8
    windows = []
    for _ in range(passes):
        picks = pick_views(source_index, rng)
        if layout is None:
            windows.append((None, rng.permutation(picks).astype(np.int32)))
            continue
        block = layout.file_rows[picks] // layout.block_rows
        blocks = np.unique(block)
        if len(blocks) <= layout.window_blocks:
            windows.append((blocks, rng.permutation(picks).astype(np.int32)))
            continue
        # Stratified: consecutive runs of n_windows blocks each send one block, at random, to every window, so
        # each window spans the whole file (rows are ordered by file path, hence by class: a random set of
        # blocks would give one window mostly one class, and its batches would drift).
        n_windows = -(-len(blocks) // layout.window_blocks)
        strata = -(-len(blocks) // n_windows)
        window_of = rng.permuted(np.tile(np.arange(n_windows), (strata, 1)), axis=1).ravel()[:len(blocks)]
        for window in rng.permutation(n_windows):
            group = blocks[window_of == window]
            windows.append((group, rng.permutation(picks[np.isin(block, group)]).astype(np.int32)))
    return windows


def class_weights(labels: np.ndarray) -> np.ndarray:
    """Balanced weights ``n / (2 n_class)`` for classes 0 and 1, as sklearn's ``class_weight='balanced'``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2)[:2]
    return (len(labels) / (2.0 * np.maximum(counts, 1))).astype(np.float32)


def fit_head(models: HeadModels, train: TrainViews, val_pooled: np.ndarray, val_labels: np.ndarray,
             params: HeadParams, *, seed: int, max_epochs: int = 30, patience: int = 5,
             on_epoch: Callable[[int, dict], bool] | None = None) -> FitResult:
    """Train the head on pooled vectors: BCE, Adam, early stopping on validation loss, best weights restored.

    Each epoch draws one view of every training image (``sample_views``), so an epoch sees each image
    once, as the reference ImageDataGenerator loop did, and each view is one of the cached augmentations;
    on a small training set an epoch is several such passes (``epoch_rows``). Early stopping watches the
    validation loss weighted as training weighs the classes (unweighted unless ``params.class_weight``):
    the loss the trial minimises. The scores it returns are unweighted, so trials can be compared.
    The arithmetic is Keras's (Dense, Dropout, L2, BinaryCrossentropy, Adam; ``test_head`` checks it step
    by step) written once as graphs that take the weights as arguments, so they are traced once per
    process rather than once per trial; the result is assigned to ``models``.

    Args:
        models: from ``build_head``, holding the seeded initial weights; trained in place.
        train: training views; ``train.pooled`` may already be a tf.Tensor (converted once by the caller), or
            None with ``train.stream`` giving each window's views (the same batches, a window in memory at a time).
        val_pooled: (m, c) validation pooled vectors (originals only), or an object whose ``batches()`` yields
            them ``VAL_BATCH_ROWS`` at a time.
        val_labels: (m,) 0/1.
        params: hyperparameters (the layer sizes must match ``models``).
        seed: seeds the per-epoch view draws, the shuffling and dropout.
        max_epochs: epoch limit.
        patience: epochs without a lower (class-weighted) validation loss before stopping.
        on_epoch: ``on_epoch(epoch, scores) -> stop``, called after each epoch (1-based) with that
            epoch's validation scores; returning True stops training (used for pruning).

    Returns:
        FitResult with validation scores of the restored weights.
    """
    if np.ndim(train.labels) == 2:  # (n, k) targets, NaN masked: the multi-label head
        from featcache.multilabel import fit_multilabel_views

        return fit_multilabel_views(models, train, val_pooled, val_labels, params, seed=seed, max_epochs=max_epochs,
                                    patience=patience, on_epoch=on_epoch)
    if models.pooled.output_shape[-1] > 1:  # three or more classes: the softmax head
        from featcache.multiclass import fit_softmax_head

        return fit_softmax_head(models, train, val_pooled, val_labels, params, seed=seed, max_epochs=max_epochs,
                                patience=patience, on_epoch=on_epoch)
    class_weight = class_weights(train.labels) if params.class_weight else np.ones(2, np.float32)
    labels = np.asarray(train.labels, np.int64)
    from featcache.trainer import BINARY_TASK, fit_epochs

    loss = binary_cross_entropy if params.class_weight else None
    return fit_epochs(models, BINARY_TASK, train, labels.astype(np.float32), class_weight[labels], val_pooled,
                      val_labels, class_weight[np.asarray(val_labels, np.int64)], loss, params, seed=seed,
                      max_epochs=max_epochs, patience=patience, on_epoch=on_epoch)


def binary_cross_entropy(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean binary cross-entropy of probabilities clipped as Keras clips them; with ``weights``, the
    weighted mean (normalised by the weights' sum)."""
    labels = np.asarray(labels, np.float64)
    clipped = np.clip(np.asarray(probs, np.float64), EPSILON, 1 - EPSILON)
    losses = -(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
    return float(np.average(losses, weights=weights))


def score_probs(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    """Validation scores of probabilities: mean BCE, ROC-AUC and, at ``threshold`` (positive if
    ``prob >= threshold``), accuracy, sensitivity and specificity.

    Raises:
        FeatcacheError: ``labels`` lacks one of the classes (ROC-AUC is undefined).
    """
    from sklearn.metrics import roc_auc_score

    if np.ndim(labels) == 2:  # (m, k) targets of a multi-label head: macro scores at 0.5 (featcache.multilabel)
        from featcache.multilabel import score_multilabel

        return score_multilabel(labels, probs)
    if np.ndim(probs) == 2:  # (m, k) probabilities of a multi-class head: argmax, macro one-vs-rest scores
        from featcache.multiclass import score_multiclass

        return score_multiclass(labels, probs)
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(np.unique(labels)) < 2:
        raise FeatcacheError(f"Validation needs both classes to score a head. Received: labels={np.unique(labels).tolist()}")
    loss = binary_cross_entropy(labels, probs)
    predicted = probs >= threshold
    positive = labels == 1
    return {
        "loss": float(loss),
        "roc_auc": float(roc_auc_score(labels, probs)),
        "accuracy": float(np.mean(predicted == positive)),
        "sensitivity": float(np.mean(predicted[positive])),
        "specificity": float(np.mean(~predicted[~positive])),
    }


def choose_threshold(labels: np.ndarray, probs: np.ndarray, min_sensitivity: float | None = None) -> tuple[float, str]:
    """Decision threshold on validation scores (positive if ``prob >= threshold``).

    Youden's J (max sensitivity + specificity - 1) by default; with ``min_sensitivity``, the highest
    threshold whose sensitivity is at least that (so the best specificity among those meeting it).

    Returns:
        (threshold, method) with method ``"youden"`` or ``"min_sensitivity=<x>"``.
    """
    from sklearn.metrics import roc_curve

    if np.ndim(probs) == 2:  # multi-class: the decision is the argmax, no threshold (featcache.multiclass)
        from featcache.multiclass import ARGMAX, ARGMAX_THRESHOLD

        return ARGMAX_THRESHOLD, ARGMAX
    fpr, tpr, thresholds = roc_curve(np.asarray(labels).astype(np.int64), probs, drop_intermediate=False)
    if min_sensitivity is None:
        index, method = int(np.argmax(tpr - fpr)), "youden"
    else:
        index, method = int(np.flatnonzero(tpr >= min_sensitivity)[0]), f"min_sensitivity={min_sensitivity:g}"
    return float(min(thresholds[index], 1.0)), method

