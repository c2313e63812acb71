"""Command line: options -> config -> one library call -> summary. The only module importing typer.

Expected errors (FeatcacheError) print one red line and exit 1; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from featcache.decode import MAX_PIXELS
from featcache.errors import FeatcacheError
from featcache.tflog import quiet_tensorflow_startup

app = typer.Typer(
    help="Cache frozen-backbone features once, tune heads on the cache, export the end-to-end model.",
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    add_completion=False,
)

CacheDir = Annotated[Path, typer.Option("--cache-dir", help="Folder of the feature caches and runs.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of augmentation, split, random weights and the search.")]
MaxPixels = Annotated[int, typer.Option("--max-pixels", help="Skip images of more pixels (width x height, read from the header before decoding).")]


def _fail(error: FeatcacheError) -> None:
    typer.secho(f"Error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.command()
def extract(
    data: Annotated[Path, typer.Option("--data", help="Kermany-layout folder (train/, optional val/, test/), or the folder the --labels paths are relative to.")],
    backbone: Annotated[Optional[list[str]], typer.Option("--backbone", help="vgg16, resnet152 (repeatable; default both), any keras.applications architecture (densenet121, efficientnetv2b0, convnext_tiny, ...; 'featcache backbones' lists them) or tiny (tests).")] = None,
    weights: Annotated[str, typer.Option("--weights", help="imagenet, random (seeded; offline smoke runs) or PATH to a weights file.")] = "imagenet",
    augment_copies: Annotated[int, typer.Option("--augment-copies", help="Augmented copies of each train image.")] = 5,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Square input side in pixels (default: the backbone's own, 224 for most, 299 for InceptionV3).")] = None,
    feature_layer: Annotated[Optional[str], typer.Option("--feature-layer", help="Cache this layer's maps instead of the backbone's last (one --backbone; 'featcache backbones NAME' lists candidates).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per backbone call.")] = 32,
    seed: Seed = 0,
    cache_dir: CacheDir = Path("cache"),
    dtype: Annotated[str, typer.Option("--dtype", help="Storage dtype of the 7x7 maps: float16 or float32.")] = "float16",
    compression: Annotated[str, typer.Option("--compression", help="HDF5 compression of the maps: none, lzf or gzip.")] = "none",
    precision: Annotated[str, typer.Option("--precision", help="auto (mixed+XLA on GPU), float32 or mixed.")] = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    max_pixels: MaxPixels = MAX_PIXELS,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="CSV label file instead of class folders: path (relative to --data), label column(s), optional patient and split (train/val/test).")] = None,
    label_columns: Annotated[Optional[str], typer.Option("--label-columns", help="Comma-separated label columns of --labels (default: every column but path/patient/split).")] = None,
    uncertain: Annotated[str, typer.Option("--uncertain", help="-1 and blank in 0/1 label columns: ignore (masked; a single column's row is left out), zero or one.")] = "ignore",
    patient_pattern: Annotated[Optional[str], typer.Option("--patient-pattern", help="Regular expression searched in each relative path; its first group is the patient id.")] = None,
    shard_rows: Annotated[Optional[int], typer.Option("--shard-rows", help="Rows per shard file (default: about 64 MiB of maps); any value gives the same cache.")] = None,
    decode: Annotated[str, typer.Option("--decode", help="exact (the reference's pixels) or fast (large JPEGs decoded at 1/2-1/8 scale in the IDCT first; evaluate, export and predict follow the cache).")] = "exact",
    engine: Annotated[str, typer.Option("--engine", help="local (this process) or ray (a Ray Data actor pool; pip install \"featcache[ray]\"); either gives the same cache.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to join with --engine ray: auto (the one 'ray start' began), HOST:PORT; default: start a local one.")] = None,
    ray_actors: Annotated[Optional[int], typer.Option("--ray-actors", help="Backbone actors with --engine ray (default: one per GPU, or one per two CPUs).")] = None,
) -> None:
    """Run the frozen backbones once over every image and K augmented copies; cache the maps in HDF5."""
    from featcache.config import ExtractConfig
    from featcache.extract import extract_features, format_summary

    try:
        config = ExtractConfig(
            data_dir=data, backbones=tuple(backbone or ("vgg16", "resnet152")), weights=weights,
            augment_copies=augment_copies, image_size=image_size, batch_size=batch_size, seed=seed,
            cache_dir=cache_dir, dtype=dtype, compression=None if compression == "none" else compression,
            precision=precision, progress=progress, max_pixels=max_pixels, feature_layer=feature_layer, labels=labels,
            label_columns=tuple(c.strip() for c in label_columns.split(",") if c.strip()) if label_columns else None,
            uncertain=uncertain, patient_pattern=patient_pattern, shard_rows=shard_rows, decode=decode,
            engine=engine, ray_address=ray_address, ray_actors=ray_actors,
        )
        summaries = extract_features(config)
    except FeatcacheError as error:
        _fail(error)
    for summary in summaries:
        typer.echo(format_summary(summary))


@app.command()
def info(
    cache: Annotated[Optional[Path], typer.Argument(help="A cache file, or a folder of caches (default: cache).")] = None,
) -> None:
    """Print a cache's manifest and counts."""
    from featcache.cache import describe_cache

    try:
        typer.echo(describe_cache(cache or Path("cache")))
    except FeatcacheError as error:
        _fail(error)


@app.command("backbones")
def backbones(
    name: Annotated[Optional[str], typer.Argument(help="A backbone: show its feature shape and --feature-layer candidates.")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Input side (default: the backbone's own).")] = None,
) -> None:
    """List the backbones (any keras.applications architecture), or one backbone's feature shape and layers."""
    from featcache.backbone_info import describe_backbone, describe_backbones

    try:
        typer.echo(describe_backbone(name, image_size) if name else describe_backbones())
    except FeatcacheError as error:
        _fail(error)


@app.command()
def compact(
    cache: Annotated[Path, typer.Argument(help="A cache file, or a folder of caches.")] = Path("cache"),
    prune_only: Annotated[bool, typer.Option("--prune-only", help="Only delete shard files no cache in the folder maps.")] = False,
) -> None:
    """Merge a sharded cache into one plain file (same name and data), then delete shard files no cache maps."""
    from featcache.compact import compact_path, format_compact

    try:
        typer.echo(format_compact(compact_path(cache, prune_only)))
    except FeatcacheError as error:
        _fail(error)


@app.command("train-head")
def train_head(
    cache_dir: CacheDir = Path("cache"),
    backbone: Annotated[Optional[list[str]], typer.Option("--backbone", help="A backbone name as given to extract (repeatable; default: every backbone with a complete cache).")] = None,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="One cache FILE to train on (when a folder holds several).")] = None,
    trials: Annotated[int, typer.Option("--trials", help="Finished trials the study should hold; a rerun with more continues it.")] = 20,
    seed: Seed = 0,
    storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna RDB URL of a shared study (default: a journal file in the run folder).")] = None,
    min_sensitivity: Annotated[Optional[float], typer.Option("--min-sensitivity", help="Use the highest threshold with this validation sensitivity (default: Youden's J).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    memory_budget: Annotated[str, typer.Option("--memory-budget", help="Cached vectors held in memory at once, e.g. 2GiB: a cache that fits is loaded whole, a larger one streamed (same trials either way); TensorFlow itself adds about 1 GiB.")] = "1GiB",
    mlflow: Annotated[Optional[str], typer.Option("--mlflow", envvar="FEATCACHE_MLFLOW_URI", help="MLflow tracking URI: log each trial (parameters, per-epoch validation metrics) and the chosen head (needs featcache[mlflow]).")] = None,
    calibrate: Annotated[str, typer.Option("--calibrate", help="Post-hoc calibration of the chosen head, fitted on validation: none, temperature (folded into the head; the exported model outputs calibrated probabilities) or isotonic (a lookup recorded in head.json and the model card; the model outputs the uncalibrated score).")] = "none",
) -> None:
    """Search the GAP -> Dense -> Dropout -> Dense head on cached pooled features; save the best head and its threshold."""
    from featcache.config import TrainHeadConfig, parse_memory_budget
    from featcache.tune import format_summary, train_heads

    try:
        config = TrainHeadConfig(cache_dir=cache_dir, backbones=tuple(backbone or ()), cache=cache, trials=trials,
                                 seed=seed, storage=storage, min_sensitivity=min_sensitivity, progress=progress,
                                 memory_budget=parse_memory_budget(memory_budget), calibrate=calibrate,
                                 mlflow=mlflow)
        summaries = train_heads(config)
    except FeatcacheError as error:
        _fail(error)
    for summary in summaries:
        typer.echo(format_summary(summary))


@app.command()
def evaluate(
    data: Annotated[Optional[Path], typer.Option("--data", help="Data folder holding test/ (default: the one each cache was extracted from).")] = None,
    cache_dir: CacheDir = Path("cache"),
    backbone: Annotated[Optional[list[str]], typer.Option("--backbone", help="Backbone to evaluate (repeatable; default: every backbone with a trained head).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples of the test set for the 95 % intervals.")] = 1000,
    seed: Seed = 0,
    max_pixels: MaxPixels = MAX_PIXELS,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Test images decoded and scored at a time.")] = 32,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    mlflow: Annotated[Optional[str], typer.Option("--mlflow", envvar="FEATCACHE_MLFLOW_URI", help="MLflow tracking URI: log the test metrics and the reports as artifacts (needs featcache[mlflow]).")] = None,
) -> None:
    """Score the reassembled end-to-end models on the raw test images, check parity with the cache, pick the best backbone by validation AUC."""
    from featcache.config import EvaluateConfig
    from featcache.evaluate import evaluate_backbones
    from featcache.reports import format_summary

    try:
        config = EvaluateConfig(cache_dir=cache_dir, data_dir=data, backbones=tuple(backbone or ()),
                                n_bootstrap=bootstrap, seed=seed, max_pixels=max_pixels, batch_size=batch_size,
                                progress=progress, mlflow=mlflow)
        reports, selection = evaluate_backbones(config)
    except FeatcacheError as error:
        _fail(error)
    typer.echo(format_summary(reports, selection))


@app.command()
def export(
    backbone: Annotated[str, typer.Option("--backbone", help="Backbone to export, or 'best': the one 'featcache evaluate' selected.")] = "best",
    out: Annotated[Path, typer.Option("--out", help="Folder to create: model.keras, model.export/ (SavedModel), model.json.")] = Path("model"),
    cache_dir: CacheDir = Path("cache"),
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier export in --out.")] = False,
) -> None:
    """Save the evaluated end-to-end model: Keras file, SavedModel taking image bytes, and a model card."""
    from featcache.config import ExportConfig
    from featcache.export import export_model

    try:
        summary = export_model(ExportConfig(cache_dir=cache_dir, backbone=backbone, out=out, force=force))
    except FeatcacheError as error:
        _fail(error)
    card = summary.card
    decision = ("argmax" if card.get("threshold_method") == "argmax" else
                "thresholds " + ", ".join(f"{n} {t:.4f}" for n, t in zip(card["class_names"], card["thresholds"]))
                if card.get("task") == "multilabel" else f"threshold {card['threshold']:.4f}")
    typer.echo(f"{card['backbone']}: {summary.out} (model.keras, model.export/, model.json); {decision}, "
               f"test accuracy {card['test_metrics']['at_threshold']['accuracy']:.3f}")


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    model: Annotated[Path, typer.Option("--model", help="Export folder written by 'featcache export'.")] = Path("model"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of lines.")] = False,
    max_pixels: MaxPixels = MAX_PIXELS,
    max_file_mb: Annotated[float, typer.Option("--max-file-mb", min=0.001, help="Skip files larger than this (MiB) unread.")] = 64.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images read, decoded and scored at a time.")] = 32,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar (on stderr).")] = True,
) -> None:
    """Label and probability per image at the exported threshold. Exit 0: all read; 2: some skipped; 1: error."""
    from featcache.predict import format_predictions, predict_files

    try:
        result = predict_files(inputs, model, batch_size=batch_size, max_pixels=max_pixels, max_file_mb=max_file_mb,
                               progress=progress)
    except FeatcacheError as error:
        _fail(error)
    typer.echo(format_predictions(result, as_json))
    for item in result.skipped if not as_json else []:
        typer.secho(f"skipped {item['path']}: {item['error']}", fg=typer.colors.YELLOW, err=True)
    if result.skipped:
        raise typer.Exit(code=2)


@app.command()
def explain(
    inputs: Annotated[Optional[list[Path]], typer.Argument(help="Image files or folders (needs --model); none: cached rows of --split.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="Export folder: explain new files end to end.")] = None,
    cache_dir: CacheDir = Path("cache"),
    backbone: Annotated[Optional[str], typer.Option("--backbone", help="Cache to explain (default: the one 'featcache evaluate' selected, else the only one).")] = None,
    split: Annotated[str, typer.Option("--split", help="Cached rows of this split: test, val or train.")] = "test",
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many cached images.")] = 32,
    data: Annotated[Optional[Path], typer.Option("--data", help="Data folder of the raw files (default: the cache's).")] = None,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Recompute each cached heatmap end to end from the raw file and compare.")] = True,
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNG overlays and heatmaps.json.")] = Path("explain"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw heatmaps as one JSON document.")] = False,
    class_name: Annotated[Optional[str], typer.Option("--class", help="Multi-class heads: the class whose heatmap to draw (default: each image's predicted class).")] = None,
) -> None:
    """Grad-CAM heatmaps of the head's decision: from cached maps (no backbone pass) or, with --model, end to end."""
    import json

    from featcache.explain import (explain_cached, explain_files, format_result, select_cache, to_json,
                                   write_explanations)

    try:
        if inputs:
            if model is None:
                raise FeatcacheError("Explaining image files needs --model (an export folder); without files, "
                                     "explain reads cached rows of --split. Received: model=None")
            result = explain_files(inputs, model, class_name=class_name)
        else:
            result = explain_cached(select_cache(cache_dir, backbone), split, limit, data, check, class_name)
        write_explanations(result, out)
    except FeatcacheError as error:
        _fail(error)
    typer.echo(json.dumps(to_json(result), indent=1) if as_json else format_result(result) + f"\n  written to {out}/")
    for item in result.skipped if not as_json else []:
        typer.secho(f"skipped {item['path']}: {item['error']}", fg=typer.colors.YELLOW, err=True)


@app.command()
def verify(
    target: Annotated[Path, typer.Argument(help="A cache file, a folder of caches, or an export folder.")] = Path("cache"),
) -> None:
    """Re-check a cache (every dataset's SHA-256, shapes, value ranges, counts, split registry) or an export
    (model.json, model.keras SHA-256 and safe-mode load, SavedModel, threshold). Exit 0: all hold; 1: not."""
    from featcache.verify import format_verification, verify_path

    try:
        results = verify_path(target)
    except FeatcacheError as error:
        _fail(error)
    typer.echo(format_verification(results))
    if not all(result.ok for result in results):
        raise typer.Exit(code=1)


def main() -> None:
    quiet_tensorflow_startup()  # before anything imports TensorFlow: no cuInit/absl notices on CPU-only machines
    # Past a file-size limit (ulimit -f) a write fails with EFBIG, reported in one line, instead of
    # SIGXFSZ killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app()
