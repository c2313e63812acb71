"""Python's cyclic garbage collector paused while ``extract`` does its per-file bookkeeping.

With TensorFlow imported a process holds about a million objects that the collector tracks, and every full
collection walks all of them. Scanning, hashing and matching 100,000 files allocates enough small objects
(records, tuples, strings) to set off several full collections: measured 4.2 s of an 18.7 s incremental run over
112,000 files. That bookkeeping makes almost no reference cycles (reference counting frees it), so the collector
is paused there and runs as usual while the backbone computes rows, and after ``extract``.
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def paused_gc():
    """No cyclic collection inside the block; the collector's previous state afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def running_gc():
    """Cyclic collection as usual inside the block (within ``paused_gc``: the long compute loop), over the objects
    made inside it: what existed before (TensorFlow's, the bookkeeping's) is frozen for the block, so collections
    there do not walk it again and again (``gc.freeze``), and unfrozen after."""
    enabled = gc.isenabled()
    gc.freeze()
    gc.enable()
    try:
        yield
    finally:
        if not enabled:
            gc.disable()
        gc.unfreeze()
