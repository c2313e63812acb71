"""``train-head`` on one synthetic cache twice, its training views held in memory and streamed within a memory
budget: what the streamed-equals-in-memory tests of the multi-class and multi-label heads compare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

WHOLE_BUDGET = 2**40  # bytes: every training view is held


def train_whole_and_streamed(write_cache: Callable[[Path], Path], tmp_path: Path, streamed_budget: int,
                             max_epochs: int) -> list[tuple]:
    """[whole, streamed]: per run ``(summary, trials rows less their wall-clock "seconds", head weights)``, each on
    its own ``write_cache(folder)``, two seeded trials; each run is checked to take the path its budget asks for."""
    import keras

    from featcache.config import TrainHeadConfig
    from featcache.runs import load_head_record, run_dir_for
    from featcache.tune import train_heads
    from featcache.views import load_head_data

    results = []
    for name, budget in (("whole", WHOLE_BUDGET), ("streamed", streamed_budget)):
        path = write_cache(tmp_path / name)
        assert load_head_data(path, budget).streamed == (name == "streamed")
        (summary,) = train_heads(TrainHeadConfig(cache=path, cache_dir=path.parent, trials=2, seed=3,
                                                 memory_budget=budget, max_epochs=max_epochs, patience=3,
                                                 progress=False))
        rows = [json.loads(line) for line in (run_dir_for(path) / "trials.jsonl").read_text().splitlines()]
        head = keras.saving.load_model(load_head_record(path)["head_path"], safe_mode=True)
        results.append((summary, [{k: v for k, v in r.items() if k != "seconds"} for r in rows], head.get_weights()))
    return results


def assert_same_training(whole: tuple, streamed: tuple) -> None:
    """The streamed run made the very trials, validation metrics and head weights of the in-memory one."""
    (held, held_rows, held_weights), (read, read_rows, read_weights) = whole, streamed
    assert read_rows == held_rows and read.val_metrics == held.val_metrics
    assert len(read_weights) == len(held_weights)
    for a, b in zip(held_weights, read_weights):
        np.testing.assert_array_equal(a, b)
