"""Run folders of ``train-head``: the Optuna study storage, the trials tables, the saved head and its
record (``head.json``), and the check that a head belongs to the cache a later stage reads.

Layout of ``<cache-dir>/runs/<cache stem>/``::

    study.journal   Optuna journal storage (default; several processes may share it)
    trials.csv      one row per finished trial (also trials.jsonl, one JSON object per line)
    head.keras      the best head: (h, w, c) maps -> sigmoid probability of class_names[1]
    head.json       its parameters, threshold, validation metrics, the probe's, and the cache fingerprint
    probe.json      the linear probe (standardized logistic regression) fitted on the same training views
    .write.lock     flock that serialises writers of head.keras + head.json
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import fcntl
import io
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np

from featcache import __version__
from featcache.cache import SUFFIX, read_manifest
from featcache.data import hash_file
from featcache.errors import CacheMismatchError, FeatcacheError
from featcache.integrity import check_plain_name, load_json

log = logging.getLogger(__name__)

RUNS = "runs"
HEAD_FILE = "head.keras"
RECORD_FILE = "head.json"
JOURNAL_FILE = "study.journal"
METRICS = ("loss", "accuracy", "roc_auc", "sensitivity", "specificity")
PROBE_FILE = "probe.json"
STARTUP_TRIALS = 5
SCHEMA_LOCK_KEY = 0x66656174636163  # PostgreSQL advisory lock taken while Optuna sets up its tables ("featcac")
# A worker records a heartbeat every HEARTBEAT_SECONDS while it runs a trial; a RUNNING trial whose last
# heartbeat is older than GRACE_SECONDS belonged to a worker that was killed (SIGKILL, OOM killer, a lost
# machine): the next worker to open the study or start a trial marks it FAIL and queues its parameters again,
# at most MAX_RETRIES times (a trial that kills every worker that runs it is not retried forever).
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
MAX_RETRIES = 2
PARAMS = ("units", "dropout", "learning_rate", "batch_size", "l2", "class_weight", "standardize")
# What later stages read from head.json; a record without them was not written by featcache (or was edited).
HEAD_FIELDS = {"backbone": str, "cache_file": str, "cache_fingerprint": str, "feature_shape": list,
               "class_names": list, "params": dict, "threshold": (int, float), "threshold_method": str,
               "val_metrics": dict, "trial_number": int, "head_file": str, "head_sha256": "sha256"}
COLUMNS = ("number", "state", "pruned", "collapsed", *PARAMS, *(f"val_{m}" for m in METRICS), "epochs", "best_epoch",
           "seconds")


def run_dir_for(cache_path: str | Path) -> Path:
    """``<cache folder>/runs/<cache file stem>``."""
    cache_path = Path(cache_path)
    return cache_path.parent / RUNS / cache_path.stem


def open_study(config, cache_path: Path, fingerprint: str, run_dir: Path, references: list[dict],
               settle=None):
    """Create or continue the study of one cache (name = cache file stem). Trial n of the study, for n below
    ``len(references)``, runs ``references[n]`` (trial 0 is the reference head), whichever worker runs it.
    ``settle`` (optional) maps the finished reference trials to parameters held fixed for every later trial
    (see ``ReferencesFirst``).

    Raises:
        FeatcacheError: the storage cannot be opened.
        CacheMismatchError: the study was started on a cache with another fingerprint.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _open_storage(config.storage, run_dir)
    name = Path(cache_path).stem
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize", load_if_exists=True,
            # never judged before it had the epochs early stopping gives it (its patience)
            pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=config.patience),
        )
        existing = len(study.trials)
    except Exception as exc:  # noqa: BLE001 - any failure here means this storage cannot hold the study
        raise FeatcacheError(f"Cannot open study {name} ({type(exc).__name__}: {_first_line(exc)}). "
                             f"Received: storage={_redact(config.storage)!r}") from exc
    # Seeded by (seed, trials so far): a fresh study is reproducible, and a continued one does not
    # replay the draws of the run before it. Workers sharing a study should use different --seed.
    sampler_seed = int(np.random.SeedSequence([config.seed, existing]).generate_state(1)[0])
    # TPE models the trials from the 6th on: the two reference trials and 3 random ones are its start
    # (Optuna's default of 10 random trials would spend half of a 20-trial budget blind).
    study.sampler = ReferencesFirst(optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=STARTUP_TRIALS),
                                    references, settle)
    _fail_stale_trials(study)  # before the trials are counted: a killed worker's trial is neither done nor waited for
    recorded = study.user_attrs.get("cache_fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise CacheMismatchError(f"Study {name} was run on a cache with fingerprint {recorded[:12]}; {cache_path} "
                                 f"has {fingerprint[:12]}. Use another --storage. Received: cache={str(cache_path)!r}")
    if recorded is None:  # several new workers may all write it: the same value
        study.set_user_attr("cache_fingerprint", fingerprint)
    return study


class ReferencesFirst:  # duck-typed optuna.samplers.BaseSampler: this module imports Optuna only when used
    """A sampler that gives trial n the parameters ``references[n]`` and asks ``base`` for every other trial.

    Why not ``study.enqueue_trial``: trial numbers are handed out atomically by every Optuna storage (a row
    lock on the study in an RDB, the order of the log in a journal), so binding the references to trial
    numbers runs each exactly once however many workers start a new study at the same instant. Enqueueing
    needs one worker to decide that the study is new; two that both see it empty both enqueue, and a worker
    that asks for a trial before the creator has enqueued samples its own trial 0.

    ``settle(reference_trials) -> dict``, when given, is called with the finished reference trials (each an
    Optuna FrozenTrial, by number) once all of them have finished; the parameters it returns are held at those
    values for every later trial, whatever ``base`` would sample. Until every reference has finished (another
    worker may still run one), nothing is held.
    """

    def __init__(self, base, references: list[dict], settle=None):
        self.base, self.references = base, [dict(params) for params in references]
        self.settle, self._held = settle, None  # ``_held``: what ``settle`` returned, once the references finished
        self._index: dict[int, int | None] = {}  # trial id -> the reference it runs (None: a searched trial)

    def held(self, study) -> dict:
        """The parameters held for trials after the references ({} until every reference trial has finished)."""
        if self.settle is None or not self.references:
            return {}
        if self._held is None:
            import optuna

            finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            done = {reference_index(t, len(self.references)): t
                    for t in study.get_trials(deepcopy=False, states=finished)}
            if any(index not in done for index in range(len(self.references))):
                return {}
            self._held = dict(self.settle([done[index] for index in range(len(self.references))]))
        return self._held

    def _reference(self, trial) -> dict | None:
        index = self._index.get(trial._trial_id, reference_index(trial, len(self.references)))
        return None if index is None else self.references[index]

    def infer_relative_search_space(self, study, trial):
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        if self._reference(trial) is not None:
            return {}
        sampled = self.base.sample_relative(study, trial, search_space)  # multivariate TPE samples here
        return {**sampled, **{name: value for name, value in self.held(study).items() if name in sampled}}

    def sample_independent(self, study, trial, name, distribution):
        reference = self._reference(trial)
        if reference is not None and name in reference:
            return reference[name]
        held = self.held(study) if reference is None else {}
        if name in held:
            return held[name]
        return self.base.sample_independent(study, trial, name, distribution)

    def before_trial(self, study, trial) -> None:
        """Bind a new trial to its reference, if it is one: the n-th trial that is not a retry runs
        ``references[n]``. A retry of a killed trial (queued by Optuna's retry callback, with its number) takes
        a trial number of its own and carries the reference of the trial it repeats; counting retries out
        keeps every reference run, once, whatever the numbers retries took."""
        attrs = trial.system_attrs
        if "failed_trial" in attrs or REFERENCE_ATTR in attrs:
            index = reference_index(trial, len(self.references))
        else:
            retries = sum(1 for t in study.get_trials(deepcopy=False)
                          if t.number < trial.number and "failed_trial" in t.system_attrs)
            index = trial.number - retries if trial.number - retries < len(self.references) else None
            if index is not None:
                study._storage.set_trial_system_attr(trial._trial_id, REFERENCE_ATTR, index)
        self._index[trial._trial_id] = index
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


REFERENCE_ATTR = "featcache:reference"  # system attribute: the index of the reference a trial runs


def reference_index(trial, references: int) -> int | None:
    """Which reference ``trial`` runs (``ReferencesFirst.before_trial`` records it; a retry inherits it), None
    for a searched trial. Trials of studies from before the record: trial n < ``references`` runs reference n
    (and so does a retry of it)."""
    attrs = trial.system_attrs
    if REFERENCE_ATTR in attrs:
        return attrs[REFERENCE_ATTR]
    number = attrs.get("failed_trial", trial.number)
    return number if isinstance(number, int) and number < references else None


def _fail_stale_trials(study) -> None:
    """Mark FAIL (and queue again) the RUNNING trials whose worker stopped sending heartbeats."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _retry_callback():
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)


def _heartbeat_journal(backend):
    """A journal storage with Optuna's heartbeat, which only its RDB storage has: each heartbeat is a system
    attribute of the trial (the time, in seconds since the epoch) appended to the journal."""
    import optuna
    from optuna.storages._heartbeat import BaseHeartbeat

    class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
        def __init__(self, backend, callback):
            super().__init__(backend)
            self._stale_callback = callback

        def record_heartbeat(self, trial_id: int) -> None:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now, running = time.time(), (optuna.trial.TrialState.RUNNING,)
            return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=running)
                    if now - t.system_attrs.get(HEARTBEAT_ATTR, _started(t, now)) > GRACE_SECONDS]

        def get_heartbeat_interval(self) -> int:
            return HEARTBEAT_SECONDS

        def get_heartbeat_stale_trial_callback(self):
            return self._stale_callback

    return HeartbeatJournalStorage(backend, _retry_callback())


HEARTBEAT_ATTR = "featcache:heartbeat"


def _started(trial, now: float) -> float:
    return trial.datetime_start.timestamp() if trial.datetime_start is not None else now


def _open_storage(url: str | None, run_dir: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url is None:
        path = run_dir / JOURNAL_FILE
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            return _heartbeat_journal(JournalFileBackend(str(path)))
        except Exception as exc:  # noqa: BLE001
            raise FeatcacheError(f"Cannot open the study journal {path} ({type(exc).__name__}: "
                                 f"{_first_line(exc)}). Received: storage=None") from exc
    try:
        with _schema_lock(url), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: since Optuna 2.9
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                                              heartbeat_stale_trial_callback=_retry_callback())
    except Exception as exc:  # noqa: BLE001 - bad scheme, missing driver, unreachable server, ...
        fix = ("install the PostgreSQL driver: pip install 'featcache[postgres]'" if isinstance(exc, ImportError)
               and url.startswith("postgresql") else "pass an Optuna RDB URL such as sqlite:///cache/study.db or "
               "postgresql://user:password@host/db")
        raise FeatcacheError(f"Cannot open --storage {_redact(url)} ({type(exc).__name__}: {_first_line(exc)}); "
                             f"{fix}. Received: storage={_redact(url)!r}") from exc


@contextlib.contextmanager
def _schema_lock(url: str):
    """On PostgreSQL, hold an advisory lock while Optuna creates or checks its tables: workers that start on an
    empty database at the same instant would otherwise all create them, and all but one fail
    (``duplicate key value violates unique constraint "pg_type_typname_nsp_index"``)."""
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:  # a session lock: released at the latest when this connection closes
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            yield
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
    finally:
        engine.dispose()


def study_rows(study) -> list[dict]:
    """Every finished (complete or pruned) trial as a record, by trial number."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False, states=states), key=lambda t: t.number):
        metrics, fit = trial.user_attrs.get("metrics", {}), trial.user_attrs.get("fit", {})
        rows.append({
            "number": trial.number, "state": trial.state.name.lower(),
            "pruned": trial.state == optuna.trial.TrialState.PRUNED,
            # recorded by the objective; a trial of an older featcache counts as collapsed below chance
            "collapsed": bool(trial.user_attrs.get("collapsed", metrics.get("roc_auc", 0.0) <= 0.5)),
            "params": {key: trial.params[key] for key in PARAMS if key in trial.params},
            **{f"val_{m}": metrics.get(m) for m in METRICS},
            **{key: fit.get(key) for key in ("epochs", "best_epoch", "seconds", "seed", "max_epochs", "patience")},
        })
    return rows


def write_tables(run_dir: Path, rows: list[dict]) -> None:
    """``trials.csv`` (flat columns) and ``trials.jsonl`` (one record a line), each replaced atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **row["params"]})
    _write_atomic(run_dir / "trials.csv", text.getvalue())
    _write_atomic(run_dir / "trials.jsonl", "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def write_head(run_dir: Path, head, cache_path: Path, manifest: dict, best: dict, threshold: float, method: str,
               val_metrics: dict, study_name: str, probe: dict, keep=None, calibration: dict | None = None,
               extra: dict | None = None) -> dict:
    """Save ``head.keras`` then ``head.json`` (with the head's SHA-256), each via a temporary name + rename,
    under a lock, so readers see either the old pair or the new one.

    Args:
        keep: called under the lock with the ``head.json`` already there (if any); when it returns True that
            head stays and nothing is written (a worker that finished later saved a better trial).
        calibration: the post-hoc calibration record (``posthoc.calibrate_head``); None: not calibrated (no key).
        extra: keys a task adds (a multi-label head: ``task``, ``thresholds``, ``positive_class``,
            ``majority_floor``); None or empty: none (binary and multi-class head.json unchanged).

    Returns:
        The record of the head now in ``run_dir`` (this one, or the one kept).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".write.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocking: concurrent workers take turns
        saved = _read_json(run_dir / RECORD_FILE)
        if keep is not None and saved is not None and keep(saved):
            log.info("kept the head of trial %s already in %s", saved.get("trial_number"), run_dir)
            return saved
        tmp = run_dir / f".head-{os.getpid()}.tmp.keras"
        head.save(tmp)
        digest = hash_file(tmp)
        os.replace(tmp, run_dir / HEAD_FILE)
        record = {
            "backbone": manifest["backbone"], "cache_file": Path(cache_path).name,
            "cache_fingerprint": manifest["fingerprint"], "feature_shape": list(manifest["feature_shape"]),
            "class_names": list(manifest["class_names"]),
            "positive_class": manifest["class_names"][1] if len(manifest["class_names"]) == 2 else "(argmax)",
            "params": best["params"], "threshold": threshold, "threshold_method": method,
            "val_metrics": val_metrics, "probe": probe, "trial_number": best["number"], "seed": best["seed"],
            "epochs": best["epochs"], "best_epoch": best["best_epoch"], "study_name": study_name,
            "head_file": HEAD_FILE, "head_sha256": digest, "featcache_version": __version__,
            **({"calibration": calibration} if calibration else {}),
            **(extra or {}),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        _write_atomic(run_dir / RECORD_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def _read_json(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def load_head_record(path: str | Path) -> dict:
    """The record of a trained head, from its run folder, its ``head.json`` or the cache file it was trained on.

    Returns:
        head.json's contents plus ``run_dir`` and ``head_path`` (absolute paths as strings).

    Raises:
        FeatcacheError: no trained head there.
        DamagedFileError: head.json is not JSON, lacks a field or has one of the wrong type.
        CacheMismatchError: head.keras is not the file head.json describes (changed or half replaced).
    """
    path = Path(path)
    run_dir = run_dir_for(path) if path.suffix == SUFFIX else path.parent if path.suffix == ".json" else path
    record_path = run_dir / RECORD_FILE
    if not record_path.is_file():
        raise FeatcacheError(f"No trained head in {run_dir}; run 'featcache train-head' first. Received: path={str(path)!r}")
    fix = "re-run 'featcache train-head'."
    record = load_json(record_path, HEAD_FIELDS, fix)
    head_path = run_dir / check_plain_name(record["head_file"], record_path, fix)
    if not head_path.is_file() or hash_file(head_path) != record["head_sha256"]:
        raise CacheMismatchError(f"{head_path} is not the head {record_path.name} describes; re-run "
                                 f"'featcache train-head'. Received: path={str(path)!r}")
    return {**record, "run_dir": str(run_dir.resolve()), "head_path": str(head_path.resolve())}


def check_head_matches_cache(record: dict, cache_path: str | Path) -> dict:
    """Refuse a head trained on another cache; returns the cache's manifest.

    Raises:
        CacheMismatchError: the fingerprints differ (or the cache is of another format version).
        IncompleteCacheError: the cache is unfinished.
    """
    manifest = read_manifest(cache_path)
    if manifest["fingerprint"] != record["cache_fingerprint"]:
        raise CacheMismatchError(
            f"The head in {record.get('run_dir', '?')} was trained on cache {record['cache_file']} (fingerprint "
            f"{record['cache_fingerprint'][:12]}); {Path(cache_path).name} has fingerprint {manifest['fingerprint'][:12]}. "
            f"Run 'featcache train-head --cache {cache_path}' first. Received: cache={str(cache_path)!r}"
        )
    return manifest


def write_probe(run_dir: Path, probe, fingerprint: str) -> Path:
    """``probe.json``: the fitted probe (``probe.Probe``) and the fingerprint of the cache it was fitted on."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / PROBE_FILE
    _write_atomic(path, json.dumps({"cache_fingerprint": fingerprint, **probe.to_dict()}) + "\n")
    return path


def load_probe(run_dir: Path, fingerprint: str):
    """The probe fitted on the cache with ``fingerprint``, or None when there is none (or of another cache)."""
    from featcache.probe import C_GRID, Probe

    path = Path(run_dir) / PROBE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        probe = Probe.from_dict(record)
    except (ValueError, KeyError, TypeError) as exc:  # damaged: it is cheap to fit again
        log.warning("ignoring the unreadable %s (%s); fitting the probe again", path, exc)
        return None
    same_grid = set(probe.val_scores.get("grid", {})) == {f"{c:g}" for c in C_GRID}
    return probe if record.get("cache_fingerprint") == fingerprint and same_grid else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)




def _redact(url: str | None) -> str | None:
    """Hide a password in a URL (``scheme://user:secret@host`` -> ``scheme://user:***@host``)."""
    return None if url is None else re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
