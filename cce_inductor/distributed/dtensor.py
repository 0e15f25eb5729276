"""DTensor entry: a vocabulary-sharded lm-head weight (``Shard(0)`` on a 1-D mesh, i.e. ``ColwiseParallel``).

``cce_inductor.linear_cross_entropy(hidden, weight, ...)`` comes here when an argument is a DTensor. It
takes the vocabulary-parallel path only when that is what the tensors say: the weight is ``Shard(0)`` on a
1-D mesh *and* ``hidden`` is a DTensor on the same mesh (so it is known to be the same on every rank after
``redistribute(Replicate())``). A plain ``hidden`` with a ``Shard(0)`` weight is refused there, because it
is ambiguous: FSDP2 also keeps parameters as ``Shard(0)`` DTensors, and its ranks hold *different* hidden
states — treating them as replicated would be silently wrong. Say it explicitly with
``cce_inductor.vocab_parallel_linear_cross_entropy`` (hidden replicated: tensor parallel) or pass
``weight.full_tensor()`` (FSDP).

The weight is unwrapped with ``to_local()`` (its gradient comes back as a ``Shard(0)`` DTensor: each rank's
rows), ``hidden`` with ``to_local()`` after ``redistribute(Replicate())`` (its gradient is already summed over
the mesh by the op, so it comes back ``Replicate``); the loss (and lse) are wrapped as ``Replicate`` DTensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.dtypes import autocast_like_linear
from . import vocab_parallel as _vp
from .local import local_vocab_parallel_loss

PLAIN_HIDDEN_MESSAGE = (
    "weight is a DTensor sharded on the vocabulary (Shard(0)) but hidden is a plain tensor: that is ambiguous "
    "(FSDP2 also shards parameters as Shard(0), and its ranks hold different hidden states). For tensor "
    "parallelism (hidden the same on every rank) call cce_inductor.vocab_parallel_linear_cross_entropy(hidden, "
    "weight, ...) or pass hidden as a DTensor (DTensor.from_local(hidden, mesh, [Replicate()])); for FSDP pass "
    "weight.full_tensor(), or compute the loss inside the lm-head module's forward, where FSDP2 has swapped in "
    "the unsharded weight")


def real_mesh(mesh):
    """The DeviceMesh behind a traced stand-in (torch >= 2.13 gives fake DTensors a FakeScriptObject mesh)."""
    if torch.compiler.is_dynamo_compiling():  # Dynamo traces the real mesh's registered members
        return mesh
    try:
        from torch._library.fake_class_registry import FakeScriptObject
    except ImportError:  # pragma: no cover
        return mesh
    return mesh.real_obj if isinstance(mesh, FakeScriptObject) else mesh


def _placements_str(t) -> str:
    return "(" + ", ".join(repr(p) for p in t.placements) + ")"


def unsupported_reason(hidden, weight, bias, targets, plain_hidden_ok: bool = False) -> Optional[str]:
    """Why these (possibly fake) values cannot take the vocabulary-parallel path; None when they can.
    ``plain_hidden_ok``: a plain hidden is accepted (the caller said it is the same on every rank).

    Shared by the eager entry and the graph rewrite, so both refuse the same cases with the same words.
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return ("hidden/bias/targets are DTensors but the weight is not: only a vocabulary-sharded DTensor weight "
                "(Shard(0), ColwiseParallel) is supported")
    mesh = real_mesh(weight.device_mesh)
    if mesh.ndim != 1:
        return f"weight is a DTensor on a {mesh.ndim}-D mesh: only 1-D meshes are supported"
    if tuple(weight.placements) != (Shard(0),):
        return (f"weight is a DTensor with placements {_placements_str(weight)}: only vocabulary sharding "
                "(Shard(0), ColwiseParallel on the lm-head) is supported")
    if not isinstance(hidden, DTensor):
        if not plain_hidden_ok:
            return PLAIN_HIDDEN_MESSAGE
    elif real_mesh(hidden.device_mesh) != mesh:
        return "hidden and weight are DTensors on different meshes"
    if bias is not None and (not isinstance(bias, DTensor) or real_mesh(bias.device_mesh) != mesh
                             or tuple(bias.placements) != (Shard(0),)):
        return "bias is not a Shard(0) DTensor on the weight's mesh"
    if isinstance(targets, DTensor) and real_mesh(targets.device_mesh) != mesh:
        return "targets are a DTensor on another mesh than the weight"
    return None


def mesh_group_name(mesh) -> str:
    """The registered name of a 1-D mesh's process group."""
    return _vp.group_name_of(mesh.get_group())


def _replicated_local(t: Tensor, mesh) -> Tensor:
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(t, DTensor):
        return t
    if tuple(t.placements) != (Replicate(),):
        t = t.redistribute(mesh, (Replicate(),))
    return t.to_local()


def dtensor_vocab_parallel_linear_cross_entropy(hidden, weight, targets, *, bias=None, ignore_index: int = -100,
                                                reduction: str = "mean", label_smoothing: float = 0.0,
                                                softcap: Optional[float] = None, logit_scale: float = 1.0,
                                                return_lse: bool = False, allow_plain_hidden: bool = False,
                                                vocab_size: Optional[int] = None,
                                                group_name: Optional[str] = None, apply_autocast: bool = True,
                                                dtensor_output: Optional[bool] = None):
    """The vocabulary-parallel loss for DTensor arguments (see the module docstring).

    ``allow_plain_hidden=True`` (the explicit ``vocab_parallel_linear_cross_entropy``) accepts a plain hidden
    the caller promises is the same on every rank. ``group_name`` (the mesh's group) is looked up when None;
    the graph rewrite passes it so no lookup is traced, ``apply_autocast=False`` (it chose the dtypes) and
    ``dtensor_output`` (the type of the loss it replaces; default: a DTensor when ``hidden`` is one).
    """
    from torch.distributed.tensor import DTensor

    if apply_autocast:  # as F.linear under autocast: float64 is not cast
        hidden, weight, bias = autocast_like_linear(hidden, weight, bias)
    reason = unsupported_reason(hidden, weight, bias, targets, plain_hidden_ok=allow_plain_hidden)
    if reason is not None:
        raise TypeError(reason)
    mesh = weight.device_mesh
    if vocab_size is not None and vocab_size != weight.shape[0]:
        raise ValueError(f"vocab_size {vocab_size} differs from the DTensor weight's global size {weight.shape[0]}")
    out = local_vocab_parallel_loss(
        _replicated_local(hidden, mesh), weight.to_local(), _replicated_local(targets, mesh),
        None if bias is None else bias.to_local(), group_name=group_name or mesh_group_name(mesh), vocab_start=-1,
        vocab_size=weight.shape[0], ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale, return_lse=return_lse)
    if dtensor_output is None:
        dtensor_output = isinstance(hidden, DTensor)
    return _wrap(out, mesh) if dtensor_output else out


def _wrap(out, mesh):
    from torch.distributed.tensor import DTensor, Replicate

    def w(t):
        return DTensor.from_local(t, mesh, (Replicate(),), run_check=False)

    return tuple(w(t) for t in out) if isinstance(out, tuple) else w(out)
