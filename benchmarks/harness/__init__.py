"""The benchmarks' shared parts, one job a file (imported as ``harness``: ``python benchmarks/x.py`` puts
``benchmarks/`` first on the path, and pytest gets it from ``pythonpath`` in pyproject.toml):

* :mod:`.shapes`  the loss-head shapes (``SHAPES``, ``MODEL_SHAPES``)
* :mod:`.inputs`  one input factory (``make_inputs``: flat / zipf; ``model_inputs``) and the eager baseline
* :mod:`.timing`  ``bench_ms`` (do_bench median), ``StepTimer`` (CUDA events per step), ``wall_s``, ``sync``, ``free``
* :mod:`.memory`  ``PeakMemory`` (max_memory_allocated over a window)
* :mod:`.errors`  errors against the float64 reference (shared with the CUDA tests)
* :mod:`.output`  ``fmt`` / tables, ``write_json`` and the run's versions (git commit, sources hash), plots
"""
from .errors import Reference, compare, errors, float64_reference, loss_and_grads
from .inputs import eager, eager_copy, make_inputs, model_inputs
from .memory import MiB, PeakMemory
from .output import (columns, fmt, gpu_name, markdown_table, now, out_path, pyplot, ratio, save_figure, versions,
                     write_json, write_text)
from .shapes import MODEL_SHAPES, SHAPES, Shape, shape
from .timing import StepTimer, bench_ms, free, is_cuda, sync, wall_s

__all__ = ["Reference", "compare", "errors", "float64_reference", "loss_and_grads", "eager", "eager_copy",
           "make_inputs", "model_inputs", "MiB", "PeakMemory", "columns", "fmt", "gpu_name", "markdown_table", "now",
           "out_path", "pyplot", "ratio", "save_figure", "versions", "write_json", "write_text", "MODEL_SHAPES",
           "SHAPES", "Shape", "shape", "StepTimer", "bench_ms", "free", "is_cuda", "sync", "wall_s"]
