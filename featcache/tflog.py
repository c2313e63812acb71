"""TensorFlow's start-up chatter, kept out of the CLI's output.

On a machine without a GPU, importing TensorFlow prints about six lines (``Could not find cuda
drivers``, ``E0000 ... failed call to cuInit``, CPU-instruction and absl notices) that read like
errors. Part of it ignores ``TF_CPP_MIN_LOG_LEVEL`` (absl writes it before its logging is set up), so
the CLI also filters those known lines out of stderr while TensorFlow is imported and looks for its
devices. Everything else written meanwhile (Python warnings included) is passed on.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

# Start-up notices of a CPU-only TensorFlow, matched line by line.
NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|cudart_stub\.cc.*Could not find cuda drivers"
    r"|cuda_platform\.cc.*failed call to cuInit"
    r"|cpu_feature_guard\.cc|^To enable the following instructions: .* rebuild TensorFlow"
    r"|oneDNN custom operations are on"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation_placer\.cc.*already registered"
    r"|TF-TRT Warning: Could not find TensorRT"
)


def quiet_tensorflow_startup() -> None:
    """For the CLI, before TensorFlow is imported: TensorFlow's C++ log level defaults to warnings-off
    (``TF_CPP_MIN_LOG_LEVEL=2``), and the first ``import tensorflow`` runs with ``NOISE`` filtered out
    of stderr. A user who sets ``TF_CPP_MIN_LOG_LEVEL`` (e.g. ``0`` to see why no GPU was found) gets
    TensorFlow's output untouched."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.meta_path.insert(0, _QuietImport())


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern = NOISE):
    """Send file descriptor 2 to a temporary file for the block, then write back every line that does
    not match ``noise``. Does nothing where descriptor 2 cannot be duplicated."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode("utf-8", "replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not noise.search(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once, through the normal finders, and runs its module code (and the device
    scan that prints the cuInit line) inside ``filtered_stderr``."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module keeps its own loader
        with filtered_stderr():
            self.loader.exec_module(module)
            module.config.list_physical_devices()  # cuInit happens here, not at import
