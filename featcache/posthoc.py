"""Post-hoc calibration of the chosen head on the validation images (``train-head --calibrate``): temperature
scaling folded into the head's own output layer, or an isotonic lookup recorded beside it.

It runs after the search has chosen the head and never feeds back into that choice. Only validation rows
(originals, never a training view or a test image) are used.

- ``temperature``: one scalar ``T > 0`` minimising the validation log-loss of ``sigmoid(logit / T)``. It is
  folded into the head's last layer, ``Dense(1, sigmoid)`` with kernel and bias divided by ``T``: that layer
  then computes exactly ``sigmoid((w.h + b) / T)``. Why this and not a ``Rescaling`` layer before an
  ``Activation("sigmoid")``: the head keeps its architecture (same layers, names and config), so head.keras,
  the reassembled model and the exported model.keras stay plain Keras that loads in safe mode, Grad-CAM's
  ``head_logit`` and every other reader of the head work unchanged, and nothing new has to be serialised. The
  price: ``T`` is not visible in the model itself; head.json, model.json and the model card record it.
- ``isotonic``: a non-decreasing step map fitted with scikit-learn's ``IsotonicRegression``. No standard Keras
  layer computes a fitted piecewise-linear lookup (a Discretization + embedding would need a custom
  interpolation), so the model keeps returning the uncalibrated score; the table (``x``, ``y`` thresholds,
  linear in between, clipped outside) is recorded in head.json and model.json, and ``evaluate`` and
  ``predict`` report the looked-up value as the *calibrated probability*. The decision threshold stays on the
  uncalibrated score.
- Multi-class heads (``Dense(k, softmax)``): ``temperature`` only, one ``T`` for every class minimising the
  validation NLL of ``softmax(z / T)``, folded into the same layer the same way (the argmax is unchanged);
  ``isotonic`` is refused in one line (``_calibrate_softmax`` says why). Their ECE is the top-label ECE and
  their Brier score the multi-class one (``featcache.multiclass_calibration``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from featcache.calibration import calibration
from featcache.config import CALIBRATE_METHODS
from featcache.errors import FeatcacheError
from featcache.head import VAL_BATCH_ROWS, binary_cross_entropy

METHODS = CALIBRATE_METHODS
# Search interval of log(1/T): T from e**-9 (sharpen 8,000x) to e**9 (flatten 8,000x).
LOG_INVERSE_BOUNDS = (-9.0, 9.0)


def head_logits(pooled_model, val_pooled) -> np.ndarray:
    """(m,) float64 logits of a binary featcache head (pooled vectors -> ``Dense(1, sigmoid)``) on the validation
    rows; (m, k) for a multi-class head (``Dense(k, softmax)``, ``featcache.multiclass``).

    The layers before the last run in inference mode (dropout off); the last layer's ``w.h + b`` is taken in
    float64, so a saturated probability (1.0 in float32) keeps its finite logit.

    Args:
        pooled_model: the head on pooled vectors (``HeadModels.pooled``).
        val_pooled: (m, c) float32, or an object whose ``batches()`` yields them (``views.ValRows``).

    Raises:
        FeatcacheError: the head ends in neither a one-unit sigmoid nor a softmax Dense layer (a multi-label head).
    """
    import keras

    last = pooled_model.layers[-1]
    softmax = _is_softmax(last)
    if not softmax and (not isinstance(last, keras.layers.Dense) or last.units != 1
                        or last.activation is not keras.activations.sigmoid):
        raise FeatcacheError(f"--calibrate needs a binary head that ends in Dense(1, sigmoid) or a multi-class one "
                             f"that ends in Dense(k, softmax). Received: last layer {type(last).__name__}"
                             f"({getattr(last, 'units', '?')})")
    kernel = np.asarray(keras.ops.convert_to_numpy(last.kernel), np.float64)
    bias = np.asarray(keras.ops.convert_to_numpy(last.bias), np.float64)
    if not softmax:
        kernel, bias = kernel[:, 0], float(bias[0])
    logits = []
    for batch in _batches(val_pooled):
        x = keras.ops.convert_to_tensor(np.asarray(batch, np.float32))
        for layer in pooled_model.layers[1:-1]:  # [0] is the InputLayer
            x = layer(x, training=False)
        logits.append(np.asarray(keras.ops.convert_to_numpy(x), np.float64) @ kernel + bias)
    return np.concatenate(logits)


def _is_softmax(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.Dense) and layer.units > 1 and layer.activation is keras.activations.softmax


def _batches(val_pooled):
    if hasattr(val_pooled, "batches"):
        yield from val_pooled.batches()
    else:
        for start in range(0, len(val_pooled), VAL_BATCH_ROWS):
            yield val_pooled[start:start + VAL_BATCH_ROWS]


def predict_pooled(pooled_model, val_pooled) -> np.ndarray:
    """(m,) float32 probabilities of the head (inference mode) on the validation rows; (m, k) for a multi-class
    head."""
    import keras

    probs = np.concatenate([np.asarray(keras.ops.convert_to_numpy(
        pooled_model(keras.ops.convert_to_tensor(np.asarray(batch, np.float32)), training=False)), np.float32)
        for batch in _batches(val_pooled)])
    return probs if _is_softmax(pooled_model.layers[-1]) else probs[:, 0]


def logit_log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits)``, computed from the logits (no clipping, no overflow)."""
    labels = np.asarray(labels, np.float64)
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """The ``T > 0`` minimising the mean log-loss of ``sigmoid(logits / T)`` (Guo et al. 2017).

    The loss is convex in ``1/T``, so a bounded scalar search over ``log(1/T)`` finds its minimum.

    Raises:
        FeatcacheError: the labels lack a class, or the logits rank the classes the wrong way round (the
            minimum is at ``1/T <= 0``: no temperature helps).
    """
    labels = np.asarray(labels, np.float64)
    logits = np.asarray(logits, np.float64)
    if len(np.unique(labels)) < 2:
        raise FeatcacheError(f"Calibration needs both classes among the validation images. "
                             f"Received: labels={np.unique(labels).astype(int).tolist()}")
    if np.mean((0.5 - labels) * logits) >= 0:  # d loss / d(1/T) at 1/T = 0: no descent towards 1/T > 0
        raise FeatcacheError("The head's validation scores rank the classes the wrong way round; temperature "
                             "scaling cannot calibrate it. Use --calibrate none or isotonic. Received: calibrate="
                             "'temperature'")
    return search_temperature(lambda inverse: logit_log_loss(labels, inverse * logits))


def search_temperature(loss: Callable[[float], float]) -> float:
    """The ``T > 0`` minimising ``loss(1 / T)``, a loss convex in ``1/T`` (binary or softmax temperature scaling):
    a bounded scalar search over ``log(1/T)`` in ``LOG_INVERSE_BOUNDS``."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(lambda u: loss(np.exp(u)), bounds=LOG_INVERSE_BOUNDS, method="bounded",
                             options={"xatol": 1e-10})
    return float(np.exp(-result.x))


def fit_isotonic(labels: np.ndarray, probs: np.ndarray) -> dict:
    """``{"x", "y"}``: the thresholds of a non-decreasing isotonic fit of the labels on the scores.

    Applied by ``apply_isotonic`` (linear between thresholds, clipped outside), as scikit-learn's
    ``IsotonicRegression(out_of_bounds="clip").predict`` does.
    """
    from sklearn.isotonic import IsotonicRegression

    labels = np.asarray(labels, np.float64)
    if len(np.unique(labels)) < 2:
        raise FeatcacheError(f"Calibration needs both classes among the validation images. "
                             f"Received: labels={np.unique(labels).astype(int).tolist()}")
    model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    model.fit(np.asarray(probs, np.float64), labels)
    return {"x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()}


def apply_isotonic(table: dict, probs: np.ndarray) -> np.ndarray:
    """(n,) calibrated probabilities: ``table`` (``fit_isotonic``) looked up at the scores ``probs``."""
    return np.interp(np.asarray(probs, np.float64), np.asarray(table["x"], np.float64),
                     np.asarray(table["y"], np.float64))


def calibrated_probability(calibration_record: dict | None, probs: np.ndarray) -> np.ndarray | None:
    """The calibrated probabilities of model scores when a lookup must be applied outside the model (isotonic);
    None when the model's own output is the probability to report (none, temperature)."""
    if not calibration_record or calibration_record.get("method") != "isotonic":
        return None
    return apply_isotonic(calibration_record["table"], probs)


def _scores(labels: np.ndarray, probs: np.ndarray) -> dict:
    point = calibration(labels, probs)
    return {"log_loss": binary_cross_entropy(labels, probs), "brier": point["brier"], "ece": point["ece"]}


def calibrate_head(method: str, models, probs: np.ndarray, labels: np.ndarray,
                   val_pooled) -> tuple[np.ndarray, dict | None]:
    """Fit ``method`` on the validation rows; for ``temperature``, fold ``T`` into ``models`` (in place).

    Args:
        method: one of ``METHODS``.
        models: the chosen head (``head.HeadModels``); its ``maps`` and ``pooled`` models share the output layer.
        probs: (m,) the head's validation probabilities, as the search scored them.
        labels: (m,) 0/1 validation labels.
        val_pooled: the validation rows (``HeadData.val_pooled``).

    Returns:
        (validation probabilities of the saved model, used for the threshold and the validation metrics;
        the record for head.json: method, T or table, images, validation log-loss/Brier/ECE before and after),
        or (``probs``, None) for ``none``.

    Raises:
        FeatcacheError: an unknown method, a multi-class head, or validation rows that cannot be calibrated.
    """
    import keras

    if method not in METHODS:
        raise FeatcacheError(f"--calibrate must be one of {', '.join(METHODS)}. Received: calibrate={method!r}")
    if method == "none":
        return probs, None
    labels = np.asarray(labels).astype(np.int64)
    if np.ndim(probs) == 2 and np.shape(probs)[1] > 2:  # a softmax head of k classes
        return _calibrate_softmax(method, models, probs, labels, val_pooled)
    if np.ndim(probs) != 1 or not np.isin(labels, (0, 1)).all():
        raise FeatcacheError(f"--calibrate {method} calibrates binary heads (one probability per image, 0/1 labels). "
                             f"Received: probs shape={np.shape(probs)}, labels={np.unique(labels).tolist()[:5]}")
    record = {"method": method, "fitted_on": "validation", "images": int(len(labels)),
              "validation_before": _scores(labels, probs)}
    if method == "isotonic":
        table = fit_isotonic(labels, probs)
        record.update(table=table, applies_to="the model's score (model.keras and the SavedModel output the "
                      "uncalibrated score; evaluate and predict report the calibrated probability)",
                      validation_after=_scores(labels, apply_isotonic(table, probs)))
        return probs, record
    logits = head_logits(models.pooled, val_pooled)
    temperature = fit_temperature(labels, logits)
    output = models.pooled.layers[-1]
    output.kernel.assign(keras.ops.convert_to_numpy(output.kernel) / np.float32(temperature))
    output.bias.assign(keras.ops.convert_to_numpy(output.bias) / np.float32(temperature))
    after = predict_pooled(models.pooled, val_pooled)  # the saved head's own probabilities: the threshold's scale
    record.update(temperature=temperature, validation_log_loss_of_logits={
        "before": logit_log_loss(labels, logits), "after": logit_log_loss(labels, logits / temperature)},
        validation_after=_scores(labels, after))
    return after, record


def _calibrate_softmax(method: str, models, probs: np.ndarray, labels: np.ndarray,
                       val_pooled) -> tuple[np.ndarray, dict]:
    """``calibrate_head`` for a multi-class head: one temperature for every class, folded into its
    ``Dense(k, softmax)`` (kernel and bias divided by ``T``: the layer computes ``softmax((W h + b) / T)``, and
    the argmax is unchanged). Isotonic is refused: k one-vs-rest lookups renormalised to sum to one are no
    longer the fitted lookups (so not calibrated in the sense they were fitted for), they can change the argmax
    (the decision this head reports), and no plain Keras layer applies them."""
    import keras

    from featcache.multiclass import categorical_cross_entropy
    from featcache.multiclass_calibration import calibration as multiclass_scores
    from featcache.multiclass_calibration import fit_softmax_temperature, softmax_log_loss

    classes = int(np.shape(probs)[1])
    if models is not None and not _is_softmax(models.pooled.layers[-1]):  # e.g. a multi-label Dense(k, sigmoid)
        last = models.pooled.layers[-1]
        raise FeatcacheError(f"--calibrate calibrates binary heads and multi-class (softmax) heads. Received: last "
                             f"layer {type(last).__name__}({getattr(last, 'units', '?')}, "
                             f"{getattr(getattr(last, 'activation', None), '__name__', '?')})")
    if method != "temperature":
        raise FeatcacheError(f"--calibrate {method} calibrates binary heads only; a multi-class head takes "
                             f"--calibrate temperature (one temperature for every class, argmax unchanged). "
                             f"Received: calibrate={method!r}, classes={classes}")

    def scores(p):
        point = multiclass_scores(labels, p)
        return {"log_loss": categorical_cross_entropy(labels, p), "brier": point["brier"], "ece": point["ece"]}

    record = {"method": method, "fitted_on": "validation", "images": int(len(labels)), "classes": classes,
              "ece_of": "top-class confidence", "validation_before": scores(probs)}
    logits = head_logits(models.pooled, val_pooled)
    if logits.ndim != 2:
        raise FeatcacheError(f"A multi-class head must end in Dense({classes}, softmax). Received: logits shape="
                             f"{logits.shape}")
    temperature = fit_softmax_temperature(labels, logits)
    output = models.pooled.layers[-1]
    output.kernel.assign(keras.ops.convert_to_numpy(output.kernel) / np.float32(temperature))
    output.bias.assign(keras.ops.convert_to_numpy(output.bias) / np.float32(temperature))
    after = predict_pooled(models.pooled, val_pooled)
    record.update(temperature=temperature, validation_log_loss_of_logits={
        "before": softmax_log_loss(labels, logits), "after": softmax_log_loss(labels, logits / temperature)},
        validation_after=scores(after))
    return after, record


def describe_calibration(record: dict | None) -> str:
    """One line: the method, T or the table's size, and the validation log-loss and ECE before and after."""
    if not record or record.get("method", "none") == "none":
        return "none (the head's own probabilities)"
    before, after = record["validation_before"], record["validation_after"]
    top = " (top-class)" if record.get("classes") else ""
    what = (f"temperature T = {record['temperature']:.4g} (folded into the head's output layer)"
            if record["method"] == "temperature" else
            f"isotonic lookup of {len(record['table']['x'])} points (applied outside the model)")
    return (f"{what}, fitted on {record['images']} validation images: log-loss {before['log_loss']:.4f} -> "
            f"{after['log_loss']:.4f}, ECE{top} {before['ece']:.4f} -> {after['ece']:.4f} (in-sample: on the images it was "
            f"fitted on; the test figures are the independent check)")
