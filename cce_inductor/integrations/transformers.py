"""Hugging Face models and ``Trainer`` without ever forming the logits.

``Trainer(args=TrainingArguments(torch_compile=True))`` compiles the model itself; its output holds the
logits, so they are a graph output and the rewrite leaves the loss to Inductor (``explain`` says so). What
the Trainer needs from the model during training is only the loss. So:

* :class:`LossStep` compiles ``model(**inputs).loss`` — the loss alone, so the logits are dead in the graph
  and the rewrite serves the lm-head + cross-entropy. It passes ``use_cache=False`` to models that take it
  (training never reads a cache; with checkpointing HF warns about it, a graph break), and when the model
  has activation checkpointing on, it compiles with Dynamo's
  ``skip_fwd_side_effects_in_bwd_under_checkpoint`` (see :data:`CHECKPOINT_NOTE`). It strips
  ``torch.compile``'s wrapper from the model it is given (the Trainer may hand it the compiled model), and
  records what the rewrite did in :attr:`LossStep.report` (an ``ExplainReport``), from the real compile.
* :func:`enable` (``enable(trainer)``) or :class:`CCETrainerMixin` (``class T(CCETrainerMixin, Trainer)``)
  route the Trainer's own ``compute_loss`` through a ``LossStep``: the Trainer's code runs as written
  (``num_items_in_batch`` passed to the model and the loss scaled across devices exactly as it does), only
  the model call it makes returns the loss alone. Where the logits are needed — evaluation and prediction
  (``return_outputs=True``), a label smoother, a ``compute_loss_func`` (it receives ``outputs.logits``), a
  ``compute_loss`` other than the Trainer's own (TRL's trainers, user overrides), no ``labels`` — the call is
  left as it was and :func:`report` says why.

Backend: ``args.torch_compile_backend`` (default "inductor") behind the rewrite, ``args.torch_compile_mode``;
with ``torch_compile=False`` the loss step is compiled anyway (that is what was asked for), with Inductor.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Optional

import torch

from ..backend import make_backend
from ..explain import ExplainReport, Recorder, explain

CHECKPOINT_NOTE = (
    "activation checkpointing is on: compiled with torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint"
    " = True (transformers' checkpointed layers set and restore a context variable; eager checkpointing runs that "
    "again when it recomputes a layer in the backward, compiled code does not, which changes nothing; without the "
    "flag Dynamo runs the layers eagerly and the lm-head's graph returns the logits)")


def _uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module under ``torch.compile``'s wrapper (``OptimizedModule``), if any."""
    return getattr(model, "_orig_mod", model) if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model


def _innermost(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under DDP (``.module``) and PEFT (``get_base_model()``) wrappers."""
    m = _uncompiled(model)
    for _ in range(4):
        if isinstance(m, torch.nn.parallel.DistributedDataParallel):
            m = m.module
        elif hasattr(m, "get_base_model") and callable(m.get_base_model):
            inner = m.get_base_model()
            if inner is m:
                break
            m = inner
        else:
            break
        m = _uncompiled(m)
    return m


def takes_use_cache(model: torch.nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(_innermost(model).forward).parameters
    except (TypeError, ValueError):
        return False


def is_checkpointed(model: torch.nn.Module) -> bool:
    """Whether any layer of the model has Hugging Face activation checkpointing on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in _innermost(model).modules())


def _loss_of(model: torch.nn.Module, inputs: dict) -> Any:
    out = model(**inputs)
    return out["loss"] if isinstance(out, dict) else out[0]


class LossStep:
    """``step(model, **inputs)``: ``model(**inputs).loss``, compiled with the rewrite, the logits never formed.

    ``backend``: the compiler behind the rewrite ("inductor", "aot_eager", ...); ``mode``/``dynamic`` as for
    ``torch.compile``. ``skip_side_effect_replay``: under activation checkpointing, compile with Dynamo's
    ``skip_fwd_side_effects_in_bwd_under_checkpoint`` (default True; see :data:`CHECKPOINT_NOTE`). False keeps
    Dynamo's default: the checkpointed layers then run eagerly and the logits are formed (``report`` says so).
    """

    def __init__(self, backend: str = "inductor", mode: Optional[str] = None, dynamic: Optional[bool] = None,
                 skip_side_effect_replay: bool = True):
        self._recorder = Recorder()
        self.skip_side_effect_replay = skip_side_effect_replay
        self.backend, self.mode, self.dynamic = backend, mode, dynamic
        self._compiled = torch.compile(_loss_of, backend=make_backend(backend, on_result=self._recorder.on_result),
                                       mode=mode, dynamic=dynamic)

    @property
    def report(self) -> ExplainReport:
        """What the rewrite did to the graphs this step compiled so far, the graph breaks meanwhile, and notes."""
        return self._recorder.report

    def note(self, text: str) -> None:
        if text not in self.report.findings:
            self.report.findings.append(text)

    def inputs_for(self, model: torch.nn.Module, inputs: dict) -> dict:
        kwargs = dict(inputs)
        if "use_cache" not in kwargs and takes_use_cache(model):
            kwargs["use_cache"] = False
        return kwargs

    def _flags(self, model: torch.nn.Module):
        if self.skip_side_effect_replay and is_checkpointed(model):
            self.note(CHECKPOINT_NOTE)
            return torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
        return contextlib.nullcontext()

    def __call__(self, model: torch.nn.Module, **inputs: Any) -> torch.Tensor:
        core = _uncompiled(model)
        with self._recorder.watch(), self._flags(core):
            return self._compiled(core, self.inputs_for(core, inputs))

    def explain(self, model: torch.nn.Module, **inputs: Any) -> ExplainReport:
        """``cce_inductor.explain`` of this step's function on ``inputs`` (a fresh compile; Dynamo is reset)."""
        core = _uncompiled(model)
        with self._flags(core):
            return explain(_loss_of, core, self.inputs_for(core, inputs))


# ---- the Trainer ------------------------------------------------------------------------------------------

def _trainer_class():
    from transformers import Trainer

    return Trainer


def _why_logits_needed(trainer: Any, original: Callable, inputs: dict, return_outputs: bool) -> Optional[str]:
    """Why this ``compute_loss`` call must keep the model call as it is (None: it needs the loss alone)."""
    fn = getattr(original, "__func__", original)
    if fn is not _trainer_class().compute_loss:
        return (f"{type(trainer).__name__}.compute_loss is not the Trainer's own: left as it is (it may read more "
                "than the loss, e.g. TRL's trainers read per-token outputs of their own fused lm-head)")
    if return_outputs:
        return "evaluation / prediction (return_outputs=True) reads the logits: the model call is left as it is"
    if getattr(trainer, "compute_loss_func", None) is not None:
        return ("a compute_loss_func receives outputs.logits, so the logits are formed: the model call is left as it "
                "is (compute the loss inside the model, or from the hidden states with "
                "cce_inductor.linear_cross_entropy, to fuse it)")
    if getattr(trainer, "label_smoother", None) is not None:
        return "label_smoothing_factor uses the Trainer's LabelSmoother on the logits: the model call is left as it is"
    if "labels" not in inputs:
        return "the batch has no labels (the model computes no loss): the model call is left as it is"
    pc = getattr(getattr(trainer, "accelerator", None), "parallelism_config", None)
    if pc is not None and getattr(pc, "sp_enabled", False):
        return "sequence parallelism computes the loss its own way: the model call is left as it is"
    return None


class _LossOnly:
    """What the Trainer's ``compute_loss`` calls in place of the model: the loss alone, as ``{"loss": ...}``."""

    def __init__(self, step: LossStep, model: torch.nn.Module):
        self.step, self.model = step, model

    def __call__(self, **inputs: Any) -> dict:
        return {"loss": self.step(self.model, **inputs)}

    def __getattr__(self, name: str) -> Any:  # anything else the Trainer reads, from the model
        return getattr(self.model, name)


def loss_step_of(trainer: Any) -> LossStep:
    """The trainer's :class:`LossStep` (made on first use from its ``TrainingArguments``)."""
    step = getattr(trainer, "_cce_loss_step", None)
    if step is None:
        args = trainer.args
        backend = getattr(trainer, "_cce_backend", None) or (args.torch_compile_backend if args.torch_compile else
                                                               None) or "inductor"
        mode = args.torch_compile_mode if args.torch_compile else None
        step = LossStep(backend, mode=mode)
        trainer._cce_loss_step = step
    return step


def compute_loss(trainer: Any, original: Callable, model: torch.nn.Module, inputs: dict, return_outputs: bool = False,
                 num_items_in_batch: Any = None) -> Any:
    """The Trainer's ``compute_loss`` (``original``) with the model call replaced by a :class:`LossStep` when
    only the loss is needed; otherwise ``original`` as it is, and the reason noted in :func:`report`."""
    step = loss_step_of(trainer)
    why = _why_logits_needed(trainer, original, inputs, return_outputs)
    if why is not None:
        if model.training:
            step.note(why)
        return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
    return original(_LossOnly(step, model), inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)


def enable(trainer: Any, backend: Optional[str] = None) -> Any:
    """Route ``trainer``'s loss through a :class:`LossStep` (the logits never formed in training); returns it.
    ``backend``: the compiler behind the rewrite (default: ``args.torch_compile_backend`` or "inductor")."""
    original = trainer.compute_loss
    if getattr(original, "_cce_enabled", False):
        return trainer
    trainer._cce_backend = backend

    def compute_loss_fused(model, inputs, return_outputs=False, num_items_in_batch=None):
        return compute_loss(trainer, original, model, inputs, return_outputs, num_items_in_batch)

    compute_loss_fused._cce_enabled = True
    trainer.compute_loss = compute_loss_fused
    return trainer


class CCETrainerMixin:
    """``class MyTrainer(CCETrainerMixin, Trainer)``: :func:`enable` as a base class. ``cce_backend`` (class
    attribute): the compiler behind the rewrite (default: ``args.torch_compile_backend`` or "inductor")."""

    cce_backend: Optional[str] = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._cce_backend = self.cce_backend
        return compute_loss(self, super().compute_loss, model, inputs, return_outputs, num_items_in_batch)


def report(trainer: Any) -> ExplainReport:
    """What the rewrite did in the trainer's compiled loss step (filled as it compiles, during training)."""
    return loss_step_of(trainer).report


__all__ = ["LossStep", "enable", "CCETrainerMixin", "report", "compute_loss", "loss_step_of", "CHECKPOINT_NOTE",
           "is_checkpointed", "takes_use_cache"]
