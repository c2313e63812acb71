"""The head search: cached pooled vectors -> Optuna trials (TPE, median pruning) -> the best head,
its decision threshold, the trials table and the linear-probe floor, written to
``<cache-dir>/runs/<cache stem>/``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.cache import find_cache, is_multilabel, list_caches, read_manifest
from featcache.config import TrainHeadConfig
from featcache.errors import FeatcacheError, IncompleteCacheError
from featcache.head import HeadModels, HeadParams, TrainViews, build_head, choose_threshold, fit_head, score_probs
from featcache.posthoc import calibrate_head, describe_calibration
from featcache.probe import Probe, fit_probe
from featcache.runs import load_probe, open_study, run_dir_for, study_rows, write_head, write_probe, write_tables
from featcache.views import HeadData, load_head_data, probe_rows, read_train_rows

__all__ = ["HeadData", "load_head_data", "train_head", "train_heads"]  # HeadData, load_head_data: from views

log = logging.getLogger(__name__)

UNITS = (32, 64, 128, 256)
BATCH_SIZES = (64, 128, 256, 512)
L2 = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
REFERENCE = HeadParams()  # 128 units: always the first trial of a new study
STANDARDIZED_REFERENCE = HeadParams(standardize=True)  # the second trial of a new study
COLLAPSE_STD = 0.01  # validation probabilities with a smaller standard deviation count as (nearly) constant


@dataclass(frozen=True)
class TrainHeadSummary:
    backbone: str
    cache_path: Path
    run_dir: Path
    rows: list[dict]  # every finished trial of the study, by number
    best: dict  # the chosen trial's row
    threshold: float
    threshold_method: str
    val_metrics: dict  # of the chosen head at its threshold
    new_trials: int
    seconds: float
    probe: Probe  # the standardized logistic-regression floor on the same training views
    calibration: dict | None = None  # head.json's post-hoc calibration record (--calibrate), None: not calibrated
    thresholds: list[float] | None = None  # a multi-label head's per-label thresholds (class_names order)
    majority: dict | None = None  # a multi-label head's majority floor on validation (``multilabel.majority_floor``)
    class_names: list[str] | None = None


def train_heads(config: TrainHeadConfig) -> list[TrainHeadSummary]:
    """Search a head for each selected cache (``select_caches``), one after another; see ``train_head``."""
    return [_train_tracked(path, config) for path in select_caches(config)]


def _train_tracked(cache_path: Path, config: TrainHeadConfig) -> TrainHeadSummary:
    """``train_head`` inside an MLflow run of its own when ``config.mlflow`` is set (``featcache.tracking``)."""
    from featcache.tracking import log_train_summary, tracked_run

    with tracked_run(config.mlflow, f"train-head {Path(cache_path).stem}") as tracker:
        summary = train_head(cache_path, config, tracker)
        log_train_summary(tracker, summary)
    return summary


def select_caches(config: TrainHeadConfig) -> list[Path]:
    """The cache files to train on: ``config.cache``, one per ``config.backbones``, or one per backbone found.

    Raises:
        IncompleteCacheError: only unfinished extractions exist.
        FeatcacheError: no cache, or several for one backbone.
    """
    if config.cache is not None:
        backbone = read_manifest(config.cache)["backbone"]
        if config.backbones and backbone not in config.backbones:
            raise FeatcacheError(f"{config.cache} is a {backbone} cache, not {', '.join(config.backbones)}. "
                                 f"Received: cache={str(config.cache)!r}, backbones={list(config.backbones)}")
        return [Path(config.cache)]
    if config.backbones:
        return [find_cache(config.cache_dir, name) for name in config.backbones]
    names = sorted({path.stem.rsplit("-", 1)[0] for path in list_caches(config.cache_dir)})
    if names:
        return [find_cache(config.cache_dir, name) for name in names]
    if list(Path(config.cache_dir).glob("*.partial")):
        raise IncompleteCacheError(
            f"The caches in {config.cache_dir} are incomplete (an extract is running or was killed); "
            f"re-run 'featcache extract' to finish them. Received: cache_dir={str(config.cache_dir)!r}"
        )
    raise FeatcacheError(
        f"No cache in {config.cache_dir}; run 'featcache extract' first. Received: cache_dir={str(config.cache_dir)!r}"
    )


def suggest_params(trial) -> HeadParams:
    """One point of the search space (epochs come from early stopping)."""
    return HeadParams(
        units=trial.suggest_categorical("units", UNITS),
        dropout=trial.suggest_float("dropout", 0.0, 0.6),
        learning_rate=trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
        batch_size=trial.suggest_categorical("batch_size", BATCH_SIZES),
        l2=trial.suggest_categorical("l2", L2),
        class_weight=trial.suggest_categorical("class_weight", (False, True)),
        standardize=trial.suggest_categorical("standardize", (False, True)),
    )


def settle_standardize(references) -> dict:
    """What the two reference trials settle: when the reference head (raw pooled vectors) collapsed and its
    standardized twin did not, the cache's features are too badly scaled for an unstandardized head, and
    every later trial keeps ``standardize`` on instead of spending the budget on heads that collapse (issue 7:
    raw random-weight ResNet152 features collapse the head at every learning rate from 1e-3 to 3e-6).
    Otherwise (both learn, or both collapse) the search keeps both values open."""
    raw, standardized = references[0], references[1]
    if _raw_references_collapsed(raw.user_attrs.get("collapsed"), standardized.user_attrs.get("collapsed")):
        log.info("Holding standardize=on for the rest of the search: the reference head collapsed "
                 "(val ROC-AUC %.4f) and the standardized reference did not (%.4f)",
                 raw.user_attrs.get("metrics", {}).get("roc_auc", float("nan")),
                 standardized.user_attrs.get("metrics", {}).get("roc_auc", float("nan")))
        return {"standardize": True}
    return {}


def _raw_references_collapsed(raw_collapsed, standardized_collapsed) -> bool:
    return bool(raw_collapsed) and standardized_collapsed is False


def is_collapsed(probs: np.ndarray, roc_auc: float) -> bool:
    """A head that says (nearly) the same for every validation image, or ranks no better than chance."""
    return bool(np.max(np.std(probs, axis=0)) < COLLAPSE_STD or roc_auc <= 0.5)  # per class with k outputs


def train_head(cache_path: Path, config: TrainHeadConfig, tracker=None) -> TrainHeadSummary:
    """Run the trials the study still lacks on one cache, then save the best head and the tables.

    Args:
        cache_path: a complete cache file; the run folder is ``<its folder>/runs/<its stem>/``.
        config: trials, seed, storage, threshold rule, epoch limits, progress.
        tracker: a ``tracking.Tracker`` that logs each trial this process runs as a nested run; None: none.

    Returns:
        TrainHeadSummary of the study's finished trials and the saved head.

    Raises:
        IncompleteCacheError, CacheMismatchError: the cache is unfinished or of another format.
        FeatcacheError: the storage cannot be opened, or the data cannot train a binary head.
    """
    import optuna
    import tensorflow as tf

    started = time.perf_counter()
    data = load_head_data(cache_path, config.memory_budget)  # checks the cache before anything is written
    manifest = data.manifest
    multilabel = is_multilabel(manifest)
    if multilabel and config.calibrate != "none":
        raise FeatcacheError(f"--calibrate {config.calibrate} calibrates one probability per image; a multi-label head "
                             f"has one per label and is not calibrated. Use --calibrate none. "
                             f"Received: calibrate={config.calibrate!r}")
    log.info("%s: %s %d training views of %s", manifest["backbone"], "streaming" if data.streamed else "loaded",
             len(data.train.labels), cache_path.name)
    run_dir = run_dir_for(cache_path)
    study = open_study(config, cache_path, manifest["fingerprint"], run_dir,
                       references=[REFERENCE.to_dict(), STANDARDIZED_REFERENCE.to_dict()], settle=settle_standardize)
    probe = _probe(data, run_dir)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    todo = max(0, config.trials - len(study.get_trials(deepcopy=False, states=finished)))
    log.info("%s: %d trials to run on %s (study %s)", manifest["backbone"], todo, cache_path.name, study.study_name)
    train = data.train if data.streamed else dataclasses.replace(data.train,
                                                                   pooled=tf.convert_to_tensor(data.train.pooled))
    kept: dict = {}  # the best head trained in this process: {"row": ..., "head": (models, probs)}
    if todo:
        _optimize(study, _objective(config, data, train, kept, tracker), todo, config, manifest["backbone"])
    rows = study_rows(study)
    best = min((r for r in rows if not r["pruned"]), key=rank_trial, default=None)
    if best is None:
        raise FeatcacheError(f"Every trial of study {study.study_name} was pruned; run more --trials. "
                             f"Received: trials={config.trials}")
    models, probs = kept["head"] if kept.get("row", {}).get("number") == best["number"] else \
        _refit(best, data, train)
    # after the choice, never part of it; temperature rescales the head's output layer in place
    probs, calibration = calibrate_head(config.calibrate, models, probs, data.val_labels, data.val_pooled)
    extra = {}
    if multilabel:  # a threshold per label (Youden, or --min-sensitivity, on its unmasked validation rows)
        from featcache.multilabel import (PER_LABEL_THRESHOLD, choose_thresholds, majority_floor, score_multilabel,
                                          threshold_method)

        thresholds = choose_thresholds(data.val_labels, probs, config.min_sensitivity)
        threshold, method = PER_LABEL_THRESHOLD, threshold_method(config.min_sensitivity)
        val_metrics = score_multilabel(data.val_labels, probs, thresholds)
        extra = {"task": "multilabel", "thresholds": thresholds, "positive_class": "(per label)",
                 "majority_floor": majority_floor(data.train.labels, data.val_labels)}
    else:
        threshold, method = choose_threshold(data.val_labels, probs, config.min_sensitivity)
        val_metrics = score_probs(data.val_labels, probs, threshold)
    probe_record = {"c": probe.c, **{f"val_{key}": value for key, value in probe.val_scores.items()}}
    latest = {"rows": rows}
    record = write_head(run_dir, models.maps, cache_path, manifest, best, threshold, method, val_metrics,
                        study.study_name, probe=probe_record, calibration=calibration,
                        keep=_better_saved(study, best, method, latest, config.calibrate), extra=extra)
    rows = latest["rows"]
    if record["trial_number"] != best["number"]:  # another worker saved a better trial of the study meanwhile
        best = next(row for row in rows if row["number"] == record["trial_number"])
        threshold, val_metrics = record["threshold"], record["val_metrics"]
    write_tables(run_dir, rows)
    if best["val_roc_auc"] < probe.val_scores["roc_auc"]:
        log.warning("%s: the chosen head's validation ROC-AUC %.4f is below the linear probe's %.4f",
                    manifest["backbone"], best["val_roc_auc"], probe.val_scores["roc_auc"])
    return TrainHeadSummary(manifest["backbone"], Path(cache_path), run_dir, rows, best, threshold, method,
                            val_metrics, todo, time.perf_counter() - started, probe, record.get("calibration"),
                            record.get("thresholds"), record.get("majority_floor"), list(manifest["class_names"]))


def _better_saved(study, best: dict, method: str, latest: dict, calibrate: str = "none"):
    """``write_head``'s ``keep``: the saved head stays when it is a finished trial of this very study (same
    number, parameters and seed), chosen by the same threshold rule, that ranks above ``best``. Workers that
    share a run folder then leave the best head of the study there, whichever finishes last."""

    def keep(saved: dict) -> bool:
        latest["rows"] = study_rows(study)  # read under the lock: trials other workers finished meanwhile
        row = next((r for r in latest["rows"] if r["number"] == saved.get("trial_number")), None)
        return (row is not None and not row["pruned"] and saved.get("study_name") == study.study_name
                and saved.get("params") == row["params"] and saved.get("seed") == row["seed"]
                and saved.get("threshold_method") == method and rank_trial(row) < rank_trial(best)
                and (saved.get("calibration") or {}).get("method", "none") == calibrate)

    return keep


def _probe(data: HeadData, run_dir: Path) -> Probe:
    """The cache's linear probe: read from ``probe.json`` when it was fitted on this cache, else fitted and saved."""
    fingerprint = data.manifest["fingerprint"]
    probe = load_probe(run_dir, fingerprint)
    if probe is None:
        rows = probe_rows(data)  # None: every training view; else a subsample within the memory budget
        labels = data.train.labels if rows is None else data.train.labels[rows]
        pooled = read_train_rows(data, rows)
        probe = fit_probe(pooled, labels, data.val_pooled, data.val_labels, data.stats,
                          overwrite=rows is not None or data.streamed)  # a copy made for the probe alone
        write_probe(run_dir, probe, fingerprint)
    return probe


def _objective(config: TrainHeadConfig, data: HeadData, train: TrainViews, kept: dict, tracker=None):
    """Optuna's objective: fit one head, record its scores, keep it in ``kept`` if it ranks first."""
    import optuna

    def objective(trial) -> float:
        seed = config.seed + trial.number
        result, models, seconds = _fit(suggest_params(trial), seed, config.max_epochs, config.patience, data, train,
                                       trial)
        collapsed = is_collapsed(result.probs, result.scores["roc_auc"])
        trial.set_user_attr("metrics", result.scores)
        trial.set_user_attr("collapsed", collapsed)
        trial.set_user_attr("fit", {"epochs": result.epochs, "best_epoch": result.best_epoch, "seconds": seconds,
                                    "seed": seed, "max_epochs": config.max_epochs, "patience": config.patience})
        if tracker is not None:
            tracker.log_trial(trial.number, dict(trial.params), result.history, result.scores,
                              "pruned" if result.stopped else "complete")
        if result.stopped:
            raise optuna.TrialPruned()
        row = {"number": trial.number, "collapsed": collapsed, **_flat(result.scores)}
        if not kept or rank_trial(row) < rank_trial(kept["row"]):
            kept.update(row=row, head=(models, result.probs))
        return result.scores["roc_auc"]

    return objective


def _fit(params: HeadParams, seed: int, max_epochs: int, patience: int, data: HeadData, train: TrainViews,
         trial=None) -> tuple:
    """Build and fit one head from ``seed``; with a trial, report validation AUC each epoch to its pruner."""
    import keras

    def on_epoch(epoch: int, scores: dict) -> bool:
        trial.report(scores["roc_auc"], epoch)
        return trial.should_prune()

    started = time.perf_counter()
    keras.utils.set_random_seed(seed)  # initialisers and dropout
    models = build_head(tuple(data.manifest["feature_shape"]), params, data.stats,
                        classes=len(data.manifest["class_names"]), multilabel=is_multilabel(data.manifest))
    result = fit_head(models, train, data.val_pooled, data.val_labels, params, seed=seed, max_epochs=max_epochs,
                      patience=patience, on_epoch=on_epoch if trial is not None else None)
    return result, models, time.perf_counter() - started


def _refit(best: dict, data: HeadData, train: TrainViews) -> tuple[HeadModels, np.ndarray]:
    """Retrain a trial run elsewhere (an earlier run, another worker) from its parameters and seed."""
    result, models, _ = _fit(HeadParams(**best["params"]), best["seed"], best["max_epochs"], best["patience"],
                             data, train)
    if abs(result.scores["roc_auc"] - best["val_roc_auc"]) > 1e-6:
        log.warning("Retrained trial %d scores val ROC-AUC %.6f, recorded %.6f (another machine or version?)",
                    best["number"], result.scores["roc_auc"], best["val_roc_auc"])
    return models, result.probs


def _optimize(study, objective, todo: int, config: TrainHeadConfig, backbone: str) -> None:
    import optuna
    from optuna.study import MaxTrialsCallback
    from tqdm.auto import tqdm

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    with tqdm(total=todo, desc=f"train-head {backbone}", unit="trial", disable=not config.progress) as bar:
        def advance(study, trial) -> None:
            done = study.get_trials(deepcopy=False, states=states)
            values = [t.value for t in done if t.value is not None]
            collapsed = sum(bool(t.user_attrs.get("collapsed")) for t in done)
            bar.set_postfix(best_val_auc=f"{max(values):.4f}" if values else "-", collapsed=collapsed)
            bar.update(1)

        study.optimize(objective, n_trials=todo, callbacks=[MaxTrialsCallback(config.trials, states=states), advance])


def _multilabel_lines(summary: TrainHeadSummary) -> str:
    """The multi-label decision: macro validation scores, then each label's threshold and ROC-AUC."""
    m = summary.val_metrics
    lines = [f"  per-label thresholds ({summary.threshold_method}): val macro ROC-AUC {m['roc_auc']:.4f}, macro "
             f"sensitivity {m['sensitivity']:.3f}, macro specificity {m['specificity']:.3f}, macro accuracy "
             f"{m['accuracy']:.3f}"]
    lines += [f"    {name}: threshold {t:.4f}, val ROC-AUC {auc:.4f}"
              for name, t, auc in zip(summary.class_names, summary.thresholds, m["per_label_roc_auc"])]
    return "\n".join(lines)


def _flat(scores: dict) -> dict:
    return {f"val_{key}": value for key, value in scores.items()}


def rank_trial(row: dict) -> tuple:
    """Selection order: not collapsed, then higher validation ROC-AUC, lower validation loss, earlier trial."""
    return (bool(row["collapsed"]), -row["val_roc_auc"], row["val_loss"], row["number"])


def format_summary(summary: TrainHeadSummary, top: int = 5) -> str:
    """The chosen head, its threshold, the probe floor, and the ``top`` best finished trials as a table."""
    pruned = sum(r["pruned"] for r in summary.rows)
    collapsed = sum(bool(r["collapsed"]) for r in summary.rows)
    m, probe = summary.val_metrics, summary.probe
    lines = [
        f"{summary.backbone}: {len(summary.rows)} trials ({summary.new_trials} new, {pruned} pruned, {collapsed} "
        f"collapsed) on {summary.cache_path.name} in {summary.seconds:.1f} s; best trial {summary.best['number']}",
        _multilabel_lines(summary) if summary.thresholds is not None else
        (f"  decision argmax: val macro ROC-AUC {m['roc_auc']:.4f}, macro sensitivity {m['sensitivity']:.3f}, "
         f"macro specificity {m['specificity']:.3f}, accuracy {m['accuracy']:.3f}" if summary.threshold_method == "argmax"
         else f"  threshold {summary.threshold:.4f} ({summary.threshold_method}): val ROC-AUC {m['roc_auc']:.4f}, "
              f"sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f}, accuracy {m['accuracy']:.3f}"),
        f"  floor: linear probe (standardized logistic regression{' per label' if summary.thresholds else ''}, "
        f"C={probe.c:g}) val {'macro ' if summary.thresholds else ''}ROC-AUC "
        f"{probe.val_scores['roc_auc']:.4f}" + ("  <- the chosen head is BELOW the probe"
                                               if summary.best["val_roc_auc"] < probe.val_scores["roc_auc"] else ""),
        f"  head {summary.run_dir / 'head.keras'}",
    ]
    if summary.majority:
        lines.insert(-1, f"  floor: majority (each label's training majority) val macro accuracy "
                         f"{summary.majority['accuracy']:.3f}, ROC-AUC 0.5")
    if summary.calibration:
        lines.insert(-1, f"  calibration: {describe_calibration(summary.calibration)}")
    by_number = {r["number"]: r for r in summary.rows}
    if 0 in by_number and 1 in by_number and _raw_references_collapsed(by_number[0]["collapsed"],
                                                                         by_number[1]["collapsed"]):
        lines.append("  standardize held on after trial 1: the reference head collapsed, its standardized twin did not")
    lines += [
        f"  {'trial':>5} {'val_auc':>8} {'val_loss':>8} {'units':>5} {'dropout':>7} {'lr':>8} {'batch':>5} "
        f"{'l2':>7} {'cw':>3} {'std':>3} {'epochs':>6}",
    ]
    for r in sorted((r for r in summary.rows if not r["pruned"]), key=rank_trial)[:top]:
        p = r["params"]
        lines.append(f"  {r['number']:>5} {r['val_roc_auc']:>8.4f} {r['val_loss']:>8.4f} {p['units']:>5} "
                     f"{p['dropout']:>7.3f} {p['learning_rate']:>8.2e} {p['batch_size']:>5} {p['l2']:>7.0e} "
                     f"{'y' if p['class_weight'] else 'n':>3} {'y' if p.get('standardize') else 'n':>3} "
                     f"{r['epochs']:>6}" + ("  collapsed" if r["collapsed"] else ""))
    return "\n".join(lines)
