"""Test set-up, in one place:

* without a GPU the Triton kernels run on CPU tensors under the Triton interpreter: TRITON_INTERPRET is
  read when ``@triton.jit`` decorates a kernel, i.e. when ``cce_inductor.kernels`` is imported, so it is
  set here before any test imports the package (tests that need it carry ``helpers.needs_interpreter``);
* the fuzzers' budgets are hypothesis profiles: ``quick`` (the default: the README's test command),
  ``ci`` (``.ci/run``'s slow step) and ``long`` (random, for a search), chosen with
  ``--hypothesis-profile=NAME``; each fuzz test takes a share of the profile's ``max_examples``
  (``helpers.fuzz_examples``);
* tests marked ``slow`` (interpreter duplicates per dtype, Inductor twins of aot_eager tests, most HF
  families, subprocess and multi-process tests) are deselected by default (``pyproject.toml``) and run by
  ``.ci/run`` (``-m slow``).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("quick", max_examples=12, derandomize=True, **_FUZZ)
settings.register_profile("ci", max_examples=150, derandomize=True, **_FUZZ)
settings.register_profile("long", max_examples=1000, derandomize=False, **_FUZZ)
settings.load_profile("quick")  # --hypothesis-profile=NAME (hypothesis' pytest plugin) loads another


def pytest_collection_modifyitems(config, items):
    """Every hypothesis test is marked ``fuzz`` (CI's slow step runs them again with the ``ci`` profile)."""
    for item in items:
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            item.add_marker(pytest.mark.fuzz)


def _version(text):
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2])


def pytest_configure(config):
    """Fail fast with the fix, not with 60 identical interpreter tracebacks: Triton before 3.7 (the
    version torch 2.11 pins) converts 1-element arrays with ``int()`` in its interpreter, which numpy
    2.4 turned into an error; Triton 3.7 squeezes them first."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        raise pytest.UsageError(
            f"the Triton interpreter of triton {triton.__version__} cannot run with numpy {numpy.__version__} "
            "(TypeError: only 0-dimensional arrays can be converted to Python scalars); "
            "install 'numpy<2.4' or triton>=3.7 to run the CPU tests")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from a clean Dynamo state (no cache carried between tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
