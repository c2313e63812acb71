"""Frozen, validated settings of each stage; the CLI builds these from its options."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from featcache.applications import registry_key
from featcache.augment import AugmentSpec
from featcache.decode import DECODES, MAX_PIXELS
from featcache.errors import FeatcacheError
from featcache.labels import UNCERTAIN_POLICIES
from featcache.patients import check_patient_pattern
from featcache.metrics import N_BOOTSTRAP

DTYPES = ("float16", "float32")
ENGINES = ("local", "ray")  # --engine: this process, or a Ray cluster (featcache.ray_engine)
COMPRESSIONS = (None, "lzf", "gzip")
PRECISIONS = ("auto", "float32", "mixed")
CALIBRATE_METHODS = ("none", "temperature", "isotonic")  # train-head --calibrate (featcache.posthoc)
# copy_index is int16 in the cache and in the work files: copies 1..K must fit.
MAX_AUGMENT_COPIES = 2**15 - 1
# Seeds reach numpy/Keras seeding (< 2**32) as ``seed + trial number`` in train-head: leave room for the trials.
MAX_SEED = 2**31 - 1
DEFAULT_MEMORY_BUDGET = "1GiB"
SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
              "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of ``featcache extract``.

    Attributes:
        data_dir: Kermany-layout folder (``train/``, optional ``val/``, ``test/``), or the folder the paths of
            ``labels`` are relative to.
        backbones: registry names, each gets its own cache file.
        weights: ``"imagenet"``, ``"random"`` or a path to a weights file.
        augment_copies: augmented copies K of each train-split image.
        image_size: square side the images are resized to; None takes each backbone's own default
            (224 for most, 299 for InceptionV3 and Xception, see ``applications.APPLICATIONS``).
        batch_size: images per backbone call.
        seed: seeds augmentation, the split and random weights.
        cache_dir: where the caches go.
        dtype: storage dtype of the maps (pooled vectors are always float32).
        compression: HDF5 filter of the maps, or None.
        precision: ``auto`` (mixed float16 + XLA on a GPU, float32 on a CPU), ``float32`` or ``mixed``.
        progress: show a tqdm bar.
        max_pixels: images with more pixels (by their header) are skipped, not decoded.
        feature_layer: cache the maps of this layer of the backbone instead of its last output (one backbone).
        labels: a label file (CSV: path, label columns, optional patient and split) instead of class folders.
        label_columns: the label columns to use (default: every column but path/patient/split).
        uncertain: policy for -1 and blank in 0/1 columns: ``ignore`` (masked), ``zero`` or ``one``.
        patient_pattern: a regular expression searched in each relative path; its first group is the patient.
        shard_rows: rows per shard file, or None for about 64 MiB of maps (``shards.default_shard_rows``);
            not a feature setting: any value gives the same cache.
        decode: ``exact`` (the reference's pixels) or ``fast`` (JPEGs decoded at a reduced DCT scale first,
            ``decode.FAST_DECODE``); recorded in the manifest, so evaluate, export and predict decode the same way.
        engine: ``local`` (this process) or ``ray`` (a Ray Data actor pool, ``featcache.ray_engine``); not a
            feature setting: either gives the same cache.
        ray_address: the Ray cluster to join (``auto``: the one ``ray start`` began here; None: start a local one).
        ray_actors: backbone actors (default: one per GPU, or one per two CPUs where the cluster has no GPU).
    """

    data_dir: Path
    backbones: tuple[str, ...] = ("vgg16", "resnet152")
    weights: str = "imagenet"
    augment_copies: int = 5
    image_size: int | None = None
    batch_size: int = 32
    seed: int = 0
    cache_dir: Path = Path("cache")
    dtype: str = "float16"
    compression: str | None = None
    precision: str = "auto"
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    progress: bool = True
    max_pixels: int = MAX_PIXELS
    feature_layer: str | None = None
    labels: Path | None = None
    label_columns: tuple[str, ...] | None = None
    uncertain: str = "ignore"
    patient_pattern: str | None = None
    shard_rows: int | None = None
    decode: str = "exact"
    engine: str = "local"
    ray_address: str | None = None
    ray_actors: int | None = None

    def __post_init__(self) -> None:
        if self.decode not in DECODES:
            raise FeatcacheError(f"--decode must be one of {DECODES}. Received: decode={self.decode!r}")
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise FeatcacheError(f"--uncertain must be one of {UNCERTAIN_POLICIES}. Received: uncertain={self.uncertain!r}")
        if self.label_columns is not None and self.labels is None:
            raise FeatcacheError(f"--label-columns needs --labels FILE. Received: label_columns={list(self.label_columns)}")
        if self.patient_pattern is not None:
            check_patient_pattern(self.patient_pattern)
        if self.shard_rows is not None and self.shard_rows < 1:
            raise FeatcacheError(f"--shard-rows must be >= 1. Received: shard_rows={self.shard_rows}")
        if self.engine not in ENGINES:
            raise FeatcacheError(f"--engine must be one of {ENGINES}. Received: engine={self.engine!r}")
        if self.engine != "ray" and (self.ray_address is not None or self.ray_actors is not None):
            raise FeatcacheError(f"--ray-address and --ray-actors need --engine ray. Received: engine={self.engine!r}")
        if self.ray_actors is not None and self.ray_actors < 1:
            raise FeatcacheError(f"--ray-actors must be >= 1. Received: ray_actors={self.ray_actors}")
        if not self.backbones:
            raise FeatcacheError("Pass at least one --backbone. Received: backbones=()")
        _check_unique(self.backbones)
        if self.image_size is not None and self.image_size < 1:
            raise FeatcacheError(f"--image-size must be >= 1. Received: image_size={self.image_size}")
        if self.feature_layer is not None and len(self.backbones) != 1:
            raise FeatcacheError(f"--feature-layer names a layer of one backbone; pass exactly one --backbone with it. "
                                 f"Received: backbones={list(self.backbones)}")
        if not 0 <= self.augment_copies <= MAX_AUGMENT_COPIES:
            raise FeatcacheError(
                f"--augment-copies must be >= 0 and <= {MAX_AUGMENT_COPIES} (the cache stores the copy index as int16). "
                f"Received: augment_copies={self.augment_copies}"
            )
        _check_seed(self.seed)
        if self.batch_size < 1:
            raise FeatcacheError(f"--batch-size must be >= 1. Received: batch_size={self.batch_size}")
        if self.dtype not in DTYPES:
            raise FeatcacheError(f"--dtype must be one of {DTYPES}. Received: dtype={self.dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise FeatcacheError(f"--compression must be lzf, gzip or none. Received: compression={self.compression!r}")
        if self.precision not in PRECISIONS:
            raise FeatcacheError(f"--precision must be one of {PRECISIONS}. Received: precision={self.precision!r}")
        check_max_pixels(self.max_pixels)


@dataclass(frozen=True)
class TrainHeadConfig:
    """Settings of ``featcache train-head``.

    Attributes:
        cache_dir: folder of the caches; runs go to ``<cache_dir>/runs/<cache stem>/``.
        backbones: train a head for each; empty means every backbone with a complete cache.
        cache: one cache file to train on (overrides the search by backbone).
        trials: finished trials the study should hold; a study that has fewer gets the rest.
        seed: seeds the sampler, the initialisers, dropout and the per-epoch view draws.
        storage: Optuna RDB URL of a shared study; None keeps a journal file in the run folder.
        min_sensitivity: pick the highest threshold with at least this validation sensitivity
            instead of Youden's J.
        max_epochs: epoch limit of each trial.
        patience: epochs without a lower validation loss before a trial stops.
        progress: show a tqdm bar over the trials.
        memory_budget: bytes of cached vectors the process may hold at once (``parse_memory_budget``): a cache
            whose train and validation rows fit (about three times over) is loaded whole, a larger one is streamed.
        calibrate: post-hoc calibration of the chosen head on validation (``posthoc.METHODS``): none,
            temperature (folded into the head) or isotonic (a lookup recorded in head.json).
        mlflow: MLflow tracking URI to log each trial and the chosen head to (``featcache.tracking``); None: none.
    """

    cache_dir: Path = Path("cache")
    backbones: tuple[str, ...] = ()
    cache: Path | None = None
    trials: int = 20
    seed: int = 0
    storage: str | None = None
    min_sensitivity: float | None = None
    max_epochs: int = 30
    patience: int = 5
    progress: bool = True
    memory_budget: int = field(default_factory=lambda: parse_memory_budget(DEFAULT_MEMORY_BUDGET))
    calibrate: str = "none"
    mlflow: str | None = None

    def __post_init__(self) -> None:
        if self.calibrate not in CALIBRATE_METHODS:
            raise FeatcacheError(f"--calibrate must be one of {', '.join(CALIBRATE_METHODS)}. "
                                 f"Received: calibrate={self.calibrate!r}")
        if isinstance(self.memory_budget, bool) or not isinstance(self.memory_budget, int) or self.memory_budget < 1:
            raise FeatcacheError(f"memory_budget must be a positive number of bytes. "
                                 f"Received: memory_budget={self.memory_budget!r}")
        if self.trials < 1:
            raise FeatcacheError(f"--trials must be >= 1. Received: trials={self.trials}")
        _check_seed(self.seed)
        _check_unique(self.backbones)
        if self.min_sensitivity is not None and not 0 < self.min_sensitivity <= 1:
            raise FeatcacheError(
                f"--min-sensitivity must be in (0, 1]. Received: min_sensitivity={self.min_sensitivity}"
            )
        if self.max_epochs < 1 or self.patience < 1:
            raise FeatcacheError(
                f"max_epochs and patience must be >= 1. Received: max_epochs={self.max_epochs}, patience={self.patience}"
            )
        if self.storage is not None and not self.storage.strip():
            raise FeatcacheError(f"--storage must be an Optuna RDB URL. Received: storage={self.storage!r}")


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of ``featcache evaluate``.

    Attributes:
        cache_dir: folder of the caches and their ``runs/``.
        data_dir: data folder holding ``test/``; None reads the one recorded in each cache.
        backbones: evaluate these; empty means every cache with a trained head.
        n_bootstrap: bootstrap resamples of the test set for the confidence intervals.
        seed: seed of the resamples.
        batch_size: test images decoded, scored and dropped at a time (the end-to-end model's batch).
        max_pixels: test images with more pixels (by their header) are skipped, not decoded.
        progress: show a tqdm bar over the test images.
        mlflow: MLflow tracking URI to log the reports to (``featcache.tracking``); None: none.
    """

    cache_dir: Path = Path("cache")
    data_dir: Path | None = None
    backbones: tuple[str, ...] = ()
    n_bootstrap: int = N_BOOTSTRAP
    seed: int = 0
    batch_size: int = 32
    max_pixels: int = MAX_PIXELS
    progress: bool = True
    mlflow: str | None = None

    def __post_init__(self) -> None:
        check_max_pixels(self.max_pixels)
        if self.n_bootstrap < 1:
            raise FeatcacheError(f"--bootstrap must be >= 1. Received: n_bootstrap={self.n_bootstrap}")
        _check_seed(self.seed)
        if self.batch_size < 1:
            raise FeatcacheError(f"--batch-size must be >= 1. Received: batch_size={self.batch_size}")
        _check_unique(self.backbones)


@dataclass(frozen=True)
class ExportConfig:
    """Settings of ``featcache export``.

    Attributes:
        cache_dir: folder of the caches and runs.
        backbone: a backbone name, or ``"best"`` for the one ``evaluate`` selected.
        out: the folder to create (model.keras, model.export/, model.json).
        force: replace ``out`` if it exists.
    """

    cache_dir: Path = Path("cache")
    backbone: str = "best"
    out: Path = Path("model")
    force: bool = False


def parse_memory_budget(text: str) -> int:
    """A size such as ``2GiB``, ``512MiB``, ``1.5GB`` or ``1073741824`` -> bytes (K/M/G/T and KiB.. are powers of
    1024, KB/MB/GB/TB powers of 1000; case is ignored).

    Raises:
        FeatcacheError: not a positive size.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", str(text).lower())
    if match is None or match.group(2) not in SIZE_UNITS or float(match.group(1)) * SIZE_UNITS[match.group(2)] < 1:
        raise FeatcacheError(f"--memory-budget must be a positive size such as 2GiB, 512MiB or 1500000000. "
                             f"Received: memory_budget={text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def check_max_pixels(max_pixels: int) -> None:
    if max_pixels < 1:
        raise FeatcacheError(f"--max-pixels must be >= 1. Received: max_pixels={max_pixels}")


def _check_unique(backbones: tuple[str, ...]) -> None:
    if len({registry_key(b) for b in backbones}) != len(backbones):  # VGG16 and vgg16 are one backbone
        raise FeatcacheError(f"Each --backbone once, please. Received: backbones={list(backbones)}")


def _check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise FeatcacheError(f"--seed must be between 0 and {MAX_SEED}. Received: seed={seed}")
