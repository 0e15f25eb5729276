"""The benchmarks' shared parts, one job a file (imported as ``harness``: ``python benchmarks/x.py`` puts
``benchmarks/`` first on the path, and pytest gets it from ``pythonpath`` in pyproject.toml):

* :mod:`.shapes`     the loss-head shapes (``SHAPES``, ``MODEL_SHAPES``)
* :mod:`.inputs`     one input factory (``make_inputs``: flat / zipf; ``model_inputs``), the eager baseline
* :mod:`.timing`     ``bench_ms`` (do_bench median), ``StepTimer`` (CUDA events per step), ``wall_s``
* :mod:`.memory`     ``PeakMemory`` (max_memory_allocated over a window)
* :mod:`.errors`     errors against the float64 reference (shared with the CUDA tests)
* :mod:`.loss_head`  a loss head's errors, peak and fwd+bwd time in one call (or its no-grad forward's)
* :mod:`.output`     ``fmt`` / tables, ``write_json`` and the run's versions (git commit, sources hash), plots
"""
from .errors import Reference, compare, errors, float64_reference, loss_and_grads, per_token_reference  # noqa: F401
from .inputs import eager, eager_copy, make_inputs, model_inputs  # noqa: F401
from .loss_head import measure_forward, measure_loss_head  # noqa: F401
from .memory import MiB, PeakMemory  # noqa: F401
from .output import (fmt, gpu_name, markdown_table, now, out_path, pyplot, ratio, save_figure,  # noqa: F401
                     versions, write_json, write_text)
from .shapes import MODEL_SHAPES, SHAPES, Shape, shape  # noqa: F401
from .timing import StepTimer, bench_ms, free, is_cuda, matmul_ms, sync, wall_s  # noqa: F401
