"""The export folder's layout and its model card (``model.json``): what an export writes, how the card is
sealed with its own SHA-256, and the checks that prove a folder is an untouched featcache export.

``predict`` and ``verify`` read exports through ``read_card``; ``export --force`` replaces a folder only when
``check_export_folder`` passes.
"""

from __future__ import annotations

import re
from pathlib import Path

from featcache.errors import DamagedFileError, FeatcacheError
from featcache.integrity import canonical_sha256, check_file_sha256, load_json, source_name

KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "model.export"
CARD_FILE = "model.json"
SIGNATURE = "serving_default"
THRESHOLD_SIGNATURE = "threshold"  # a second SavedModel signature: () -> {"threshold": float64}
CARD_DIGEST = "card_sha256"
MODEL_CARD_FILE = "MODEL_CARD.md"  # rendered from model.json (featcache.cardtext); exports before it lack it
EXPORT_ENTRIES = frozenset({KERAS_FILE, SAVED_MODEL_DIR, CARD_FILE, MODEL_CARD_FILE})
SAVED_MODEL_ENTRIES = frozenset({"saved_model.pb", "fingerprint.pb", "variables", "assets"})
VARIABLES_FILE = re.compile(r"variables\.(index|data-\d{5}-of-\d{5})")

# What an export writes into model.json and what predict/verify rely on.
CARD_FIELDS = {"backbone": str, "image_size": int, "class_names": list, "positive_class": str,
               "threshold": (int, float), "threshold_method": str, "cache_fingerprint": str, "weights/sha256": str,
               "files/keras": str, "files/keras_sha256": "sha256", "files/saved_model": str, "files/signature": str,
               "versions/featcache": str}


def seal_card(card: dict) -> dict:
    """The card with ``card_sha256``: the SHA-256 of its canonical JSON without that field.

    It makes an edit of any field (the threshold above all) detectable by ``read_card``; it is a check
    against accidents and naive edits, not a signature: whoever edits on purpose can recompute it.
    """
    return {**card, CARD_DIGEST: canonical_sha256(card, CARD_DIGEST)}


def read_card(model_dir: str | Path, fix: str, sealed: bool = True) -> dict:
    """``model.json`` of an export folder, checked: featcache's fields and types, the file names an export
    writes, the threshold in [0, 1], and (``sealed``) its own SHA-256. model.keras is checked by the caller
    (``integrity.load_keras_checked`` or ``check_export_folder``).

    Raises:
        FeatcacheError: no model.json (not an export).
        DamagedFileError: a card that is not JSON, not featcache's, or was edited after export.
    """
    model_dir = Path(model_dir)
    path = model_dir / CARD_FILE
    if not path.is_file():
        raise FeatcacheError(f"{model_dir} is not a featcache export (no {CARD_FILE}); {fix} "
                             f"Received: model={str(model_dir)!r}")
    card = load_json(path, {**CARD_FIELDS, **({CARD_DIGEST: "sha256"} if sealed else {})}, fix)
    files = card["files"]
    if files["keras"] != KERAS_FILE or files["saved_model"] != SAVED_MODEL_DIR or not 0 <= card["threshold"] <= 1:
        raise DamagedFileError(f"{path} is not what featcache wrote (file names {files['keras']!r}, "
                               f"{files['saved_model']!r}, threshold {card['threshold']}); {fix} "
                               f"Received: {source_name(path)}")
    if CARD_DIGEST in card and card[CARD_DIGEST] != canonical_sha256(card, CARD_DIGEST):
        raise DamagedFileError(f"{path} was edited after export (its {CARD_DIGEST} no longer matches its content, "
                               f"e.g. the threshold); {fix} Received: {source_name(path)}")
    return card


def check_export_folder(folder: str | Path, fix: str) -> dict:
    """Prove that ``folder`` is an untouched featcache export: only the entries an export writes (no links,
    nothing else), a featcache card (sealed or from before cards were sealed), and a model.keras whose
    SHA-256 is the card's. Returns the card.

    Raises:
        FeatcacheError: anything else is in the folder, or a file is not what the card says.
    """
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise FeatcacheError(f"{folder} is not a featcache export (not a folder); {fix} Received: {source_name(folder)}")
    extra = _foreign_entry(folder)
    if extra is not None:
        raise FeatcacheError(f"{folder} is not a featcache export: it holds {extra}, which an export does not "
                             f"write; {fix} Received: {source_name(folder)}")
    card = read_card(folder, fix, sealed=False)
    check_file_sha256(folder / KERAS_FILE, card["files"]["keras_sha256"], folder / CARD_FILE, fix)
    return card


def _foreign_entry(folder: Path) -> str | None:
    """The first entry of ``folder`` that an export does not write (as a readable name), or None."""
    for entry in sorted(folder.iterdir()):
        kind_ok = entry.is_dir() if entry.name == SAVED_MODEL_DIR else entry.is_file()
        if entry.name not in EXPORT_ENTRIES or entry.is_symlink() or not kind_ok:
            return repr(entry.name)
    saved = folder / SAVED_MODEL_DIR
    if not saved.is_dir():
        return f"no {SAVED_MODEL_DIR}/"
    for entry in sorted(saved.rglob("*")):
        relative = entry.relative_to(folder).as_posix()
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            return repr(relative)
        parts = entry.relative_to(saved).parts
        allowed = (parts[0] in SAVED_MODEL_ENTRIES and len(parts) == 1) or (
            len(parts) == 2 and parts[0] == "variables" and VARIABLES_FILE.fullmatch(parts[1]))
        if not allowed:
            return repr(relative)
    return None
