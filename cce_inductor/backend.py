"""How the rewrite reaches users: a torch.compile backend, and a pass for plain ``torch.compile``.

* ``torch.compile(fn, backend="cce")`` or ``backend=make_backend(inner="aot_eager")``: rewrite the Dynamo
  graph, then hand it to ``inner`` (any backend name or callable; the rewrite does not depend on it).
* ``cce_inductor.install()`` (or ``with cce_inductor.install(): ...``) / ``cce_inductor.uninstall()``: add
  the same rewrite to Inductor's ``pre_grad_custom_pass`` hook, composed with a pass the user already
  installed, as a ``CustomGraphPass`` whose ``uuid()`` hashes our source files, so the FX graph cache
  and the AOTAutograd cache stay on.
"""
from __future__ import annotations

import hashlib
import functools
import os
import threading
from typing import Any, Callable, Optional, Union

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import config as cce_config
from .logging_ import log
from .rewrite import PassResult, rewrite_graph

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _source_files() -> tuple:
    """Every Python file of the package: the rewrite and the op it inserts (its signature, autograd)."""
    out = []
    for root, _dirs, files in os.walk(_PACKAGE_DIR):
        out.extend(os.path.join(root, f) for f in files if f.endswith(".py"))
    return tuple(sorted(out))


@functools.lru_cache(maxsize=1)
def _sources_digest() -> str:
    """sha256 over (path relative to the package, contents) of every source file; read once per process."""
    digest = hashlib.sha256()
    for path in _source_files():
        digest.update(os.path.relpath(path, _PACKAGE_DIR).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()


def pass_uuid() -> str:
    """A hash of our source files (names and contents) and the torch version: it changes whenever the
    rewrite could change."""
    return hashlib.sha256(f"{_sources_digest()}/{torch.__version__}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------

def _resolve_inner(inner: Union[str, Callable], kwargs: dict) -> Callable:
    """The compiler behind the rewrite, given what torch.compile passed the backend (``mode``, ``options``).

    For Inductor, ``mode``/``options`` mean what they mean in ``torch.compile(backend="inductor", ...)``:
    they become Inductor config patches, built (and validated) by the same wrapper torch.compile uses.
    Any other backend receives them as keyword arguments, as torch.compile would pass them to it.
    """
    mode, options = kwargs.pop("mode", None), kwargs.pop("options", None)
    if inner == "inductor" and (mode or options):
        return torch._TorchCompileInductorWrapper(mode, options, None)
    if mode:
        kwargs["mode"] = mode
    if options:
        kwargs["options"] = options
    if callable(inner):
        fn = inner
    else:
        from torch._dynamo.backends.registry import lookup_backend

        fn = lookup_backend(inner)
    return functools.partial(fn, **kwargs) if kwargs else fn


def make_backend(inner: Union[str, Callable] = "inductor",
                 on_result: Optional[Callable[[PassResult], None]] = None) -> Callable:
    """A torch.compile backend: rewrite linear + cross-entropy in the Dynamo graph, then compile with
    ``inner`` ("inductor", "aot_eager", "eager", or any backend callable ``(gm, example_inputs)``).

    ``torch.compile(..., mode=..., options=...)`` reach ``inner`` as they would without the rewrite
    (for Inductor: ``mode="max-autotune"``, ``"reduce-overhead"``, ``options={...}`` config patches).
    ``on_result`` (optional) receives each graph's :class:`~cce_inductor.rewrite.PassResult`.
    """

    def cce_backend_fn(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any):
        result = rewrite_graph(gm)
        if on_result is not None:
            on_result(result)
        return _resolve_inner(inner, kwargs)(gm, example_inputs)

    cce_backend_fn.__name__ = f"cce_backend_{inner if isinstance(inner, str) else getattr(inner, '__name__', 'custom')}"
    return cce_backend_fn


def cce_backend(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any):
    """``backend="cce"``: the rewrite, then Inductor (entry point ``torch_dynamo_backends: cce``);
    ``mode``/``options`` given to torch.compile configure Inductor as they do for ``backend="inductor"``."""
    rewrite_graph(gm)
    return _resolve_inner("inductor", kwargs)(gm, example_inputs)


def _register_backend() -> None:
    try:
        from torch._dynamo.backends.registry import _BACKENDS, register_backend

        if _BACKENDS.get("cce") is None:
            register_backend(name="cce")(cce_backend)
    except Exception:  # pragma: no cover - already registered through the entry point, or old torch
        log.debug("could not register backend 'cce'", exc_info=True)


_register_backend()


# ---------------------------------------------------------------------------------------------
# The Inductor pre-grad pass
# ---------------------------------------------------------------------------------------------

class CCEGraphPass(CustomGraphPass):
    """The rewrite as an Inductor ``pre_grad_custom_pass`` (a cache-safe ``CustomGraphPass``)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        rewrite_graph(graph)

    def uuid(self) -> Any:
        # config.path is written into the rewritten graph (the op's path= argument): part of the key
        return ("cce_inductor", pass_uuid(), cce_config.path)


class ComposedPass(CustomGraphPass):
    """Run the user's pre-grad pass(es) first, then ours. ``uuid()`` is None (no cache, as torch does
    for a pass without one) when one of the user's passes has no uuid."""

    def __init__(self, passes: tuple, previous: Any):
        self.passes = tuple(passes)
        self.previous = previous  # what config.pre_grad_custom_pass was before install()

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self) -> Any:
        ids = []
        for p in self.passes:
            u = p.uuid() if isinstance(p, CustomGraphPass) else None
            if u is None:
                return None
            ids.append(u)
        return ("cce_inductor.composed", tuple(ids))


_lock = threading.Lock()


class Installation:
    """Returned by :func:`install`; also a context manager that uninstalls on exit."""

    def __init__(self, installed: Any, owner: bool):
        self.installed = installed
        self.owner = owner  # False when the rewrite was already installed (a nested ``with``)

    def __enter__(self) -> "Installation":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.owner:
            uninstall()


def _is_ours(p: Any) -> bool:
    return isinstance(p, (CCEGraphPass, ComposedPass))


def install() -> Installation:
    """Add the rewrite to plain ``torch.compile`` (Inductor) via ``pre_grad_custom_pass``.

    Composes with a pass already installed there (a single pass or, on torch >= 2.13, a list). Idempotent.
    Usable as ``with cce_inductor.install(): ...``.
    """
    from torch._inductor import config

    with _lock:
        current = config.pre_grad_custom_pass
        if _is_ours(current):
            return Installation(current, owner=False)
        if current is None:
            new: Any = CCEGraphPass()
        else:
            existing = tuple(current) if isinstance(current, (list, tuple)) else (current,)
            new = ComposedPass(existing + (CCEGraphPass(),), previous=current)
        config.pre_grad_custom_pass = new
        log.debug("cce: installed pre_grad_custom_pass %r", new)
        return Installation(new, owner=True)


def uninstall() -> None:
    """Undo :func:`install`, restoring the pass that was installed before it."""
    from torch._inductor import config

    with _lock:
        current = config.pre_grad_custom_pass
        if isinstance(current, CCEGraphPass):
            config.pre_grad_custom_pass = None
        elif isinstance(current, ComposedPass):
            config.pre_grad_custom_pass = current.previous
        elif current is not None:
            log.warning("cce: pre_grad_custom_pass was replaced after install(); left as it is")


def is_installed() -> bool:
    from torch._inductor import config

    return _is_ours(config.pre_grad_custom_pass)
