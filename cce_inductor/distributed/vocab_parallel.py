"""Vocabulary-parallel linear + cross-entropy: the lm-head weight is split by rows over a process group.

Each rank holds rows ``[vocab_start, vocab_start + V_local)`` of the weight ``[V, D]`` (and of the bias),
the hidden states ``[N, D]`` and the targets ``[N]`` (global class ids) are the same on every rank
(replicated, as in Megatron / DTensor tensor parallelism). Per token, with
``z = softcap(logit_scale * (h @ W.T + b))``:

forward (logits exist one token chunk × V_local at a time, never N × V_local)
    local max ``m_r``, local sum-exp ``s_r = Σ exp(z - m_r)``, the target's logit (only the rank that owns
    the target has it, the others hold 0) and, for label smoothing, the local sum of the logits; then
    ``m = all_reduce_max(m_r)`` and one ``all_reduce_sum`` of ``[s_r · exp(m_r - m), z_target, Σ z]``.
    ``lse = m + log(s)``, and the loss is the single-process op's
    ``(1 - ε)(lse - z_t) + ε(lse - Σ_j z_j / V)`` with the global ``V``.
backward
    per token chunk: recompute the local logits, ``G = softmax · w - onehot(t) (1-ε) g - ε g / V`` (the
    softcap and scale factors as in the single-process op) with the global lse;
    ``dW_local = Gᵀ h`` and ``d_bias_local = Σ_rows G`` for the local rows only;
    ``d_hidden = all_reduce_sum(G · W_local)``.

Precision: the arithmetic after the matmul is float32 (float64 for float64 inputs). The matmuls run in
float32 too, except for 16-bit inputs on an accelerator, where they run in the input dtype on the tensor
cores (float32 accumulation inside, the logits rounded to 16 bits as eager ``F.linear`` rounds them) and
are upcast right after.

Collectives: two small all-reduces in the forward (``[N]`` then ``[2 or 3, N]``), one ``[N, D]``
all-reduce in the backward (in float32, or float64 for float64 inputs). Every rank returns the same
loss and lse, and the same d_hidden; d_weight / d_bias are the local rows' gradients.

The two custom ops (``torch.ops.cce.vocab_parallel_forward`` / ``..._backward``) take the process
group by name (``ProcessGroup.group_name``) and resolve it with c10d's resolver when they run, so they
are opaque single nodes to torch.compile (Dynamo, AOTAutograd, Inductor) and trace with no graph break.
It is chunked PyTorch (no Triton kernel), on any device.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.distributed_c10d import _resolve_process_group

from ..core.dtypes import autocast_off, stat_dtype
from ..options import LossOptions
from ..torch_impl.common import per_row, target_status, through_epilogue_

# Elements of one float32 logits chunk (token rows × V_local). On the CPU small chunks stay in cache;
# on a GPU larger chunks keep the matmuls efficient (32M elements = 128 MiB of float32 logits).
CHUNK_ELEMENTS = {"cpu": 2 * 2**20}
DEFAULT_CHUNK_ELEMENTS = 32 * 2**20


def _rows_per_chunk(n: int, v_local: int, device: torch.device) -> int:
    elements = CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS)
    return max(1, min(max(n, 1), elements // max(v_local, 1)))


def resolve_group(group_name: str) -> dist.ProcessGroup:
    """The process group registered under ``group_name`` (c10d's resolver, as functional collectives use)."""
    return _resolve_process_group(group_name)


def group_name_of(group: Optional[dist.ProcessGroup]) -> str:
    """``group``'s registered name (the default group when None)."""
    if group is None:
        group = dist.group.WORLD
    return group.group_name


def chunk_layout_start(vocab_size: int, world: int, rank: int) -> tuple[int, int]:
    """(start, rows) of ``rank``'s shard when ``vocab_size`` rows are split as ``torch.chunk`` (and DTensor's
    ``Shard(0)``) split them: ``ceil(V / world)`` rows per rank, the last ranks possibly short or empty."""
    per = -(-vocab_size // world)
    start = min(rank * per, vocab_size)
    return start, min(vocab_size, start + per) - start


def _shard_start(pg: dist.ProcessGroup, v_local: int, vocab_start: int, vocab_size: int) -> int:
    """The first global row this rank holds. ``vocab_start < 0``: the ``torch.chunk`` layout by group rank."""
    if vocab_start >= 0:
        if vocab_start + v_local > vocab_size:
            raise ValueError(f"this rank's vocabulary rows [{vocab_start}, {vocab_start + v_local}) exceed the "
                             f"vocabulary size {vocab_size}")
        return vocab_start
    start, rows = chunk_layout_start(vocab_size, pg.size(), pg.rank())
    if rows != v_local:
        raise ValueError(f"rank {pg.rank()} of {pg.size()} holds {v_local} vocabulary rows, but splitting V = "
                         f"{vocab_size} as torch.chunk / DTensor Shard(0) does gives it {rows}; pass vocab_start")
    return start


def _matmul_dtype(hidden: Tensor) -> torch.dtype:
    """16-bit inputs on an accelerator: matmuls in that dtype (tensor cores); otherwise the stat dtype."""
    if hidden.dtype in (torch.float16, torch.bfloat16) and hidden.device.type != "cpu":
        return hidden.dtype
    return stat_dtype(hidden)


def _local_logits(h: Tensor, w: Tensor, b: Optional[Tensor], opts: LossOptions, cd: torch.dtype,
                  keep_tanh: bool = True):
    """z = softcap(scale * (h @ w.T + b)) for one token chunk, in ``cd``; also tanh(.) for the softcap
    derivative when ``keep_tanh`` (else None: the forward reuses that buffer for z). ``h``/``w`` are in
    the matmul dtype, ``b`` in ``cd``."""
    if h.dtype == cd:
        z = h @ w.T if b is None else torch.addmm(b, h, w.T)
    else:
        z = (h @ w.T).to(cd)
        if b is not None:
            z.add_(b)
    if opts.logit_scale != 1.0:
        z.mul_(opts.logit_scale)
    if opts.softcap is None:
        return z, None
    th = z.div_(opts.softcap).tanh_()
    if not keep_tanh:
        return th.mul_(opts.softcap), None
    return th * opts.softcap, th


def _target_masks(t: Tensor, vocab_size: int, ignore_index: int):
    """(valid, out_of_range) over the global vocabulary: out-of-range rows are neither valid nor ignored
    (their loss is NaN, as in the single-process op)."""
    valid, bad, _ = target_status(t, vocab_size, ignore_index)
    return valid, bad


def forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, vocab_start: int,
            vocab_size: int, pg: dist.ProcessGroup, opts: LossOptions) -> tuple[Tensor, Tensor]:
    n, v_local = hidden.shape[0], weight.shape[0]
    cd, md = stat_dtype(hidden), _matmul_dtype(hidden)
    start = _shard_start(pg, v_local, vocab_start, vocab_size)
    eps = opts.label_smoothing
    w = weight.to(md)
    b = None if bias is None else bias.to(cd)
    local_max = torch.full((n,), float("-inf"), dtype=cd, device=hidden.device)
    # rows of `stats`: sum-exp relative to the local max, the target's logit, the sum of the logits
    stats = torch.zeros(3 if eps else 2, n, dtype=cd, device=hidden.device)
    if v_local > 0:
        step = _rows_per_chunk(n, v_local, hidden.device)
        for s in range(0, n, step):
            e = min(n, s + step)
            z, _ = _local_logits(hidden[s:e].to(md), w, b, opts, cd, keep_tanh=False)
            local_t = targets[s:e] - start
            owned = (local_t >= 0) & (local_t < v_local)
            target_z = z.gather(1, local_t.clamp(0, v_local - 1)[:, None]).squeeze(1)
            stats[1, s:e] = torch.where(owned, target_z, torch.zeros_like(target_z))
            if eps:
                stats[2, s:e] = z.sum(dim=-1)
            row_max = z.amax(dim=-1)
            local_max[s:e] = row_max
            stats[0, s:e] = z.sub_(row_max[:, None]).exp_().sum(dim=-1)  # z is consumed here
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=pg)
    stats[0].mul_(torch.exp(local_max - global_max))  # exp(-inf) = 0 on a rank with no rows
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=pg)
    lse = stats[0].log() + global_max
    nll = lse - stats[1]
    if eps:
        nll = (1 - eps) * nll + eps * (lse - stats[2] / vocab_size)
    valid, bad = _target_masks(targets, vocab_size, opts.ignore_index)
    return per_row(nll, valid, bad), lse


def backward(grad_loss: Tensor, grad_lse: Optional[Tensor], hidden: Tensor, weight: Tensor,
             bias: Optional[Tensor], targets: Tensor, lse: Tensor, vocab_start: int, vocab_size: int,
             pg: dist.ProcessGroup, opts: LossOptions, need_d_hidden: bool = True, need_d_weight: bool = True):
    """(d_hidden [N, D] summed over the group | None, d_weight [V_local, D] | None, d_bias [V_local] | None)."""
    n, v_local = hidden.shape[0], weight.shape[0]
    cd, md = stat_dtype(hidden), _matmul_dtype(hidden)
    start = _shard_start(pg, v_local, vocab_start, vocab_size)
    eps = opts.label_smoothing
    w = weight.to(md)
    b = None if bias is None else bias.to(cd)
    d_hidden = torch.zeros(hidden.shape, dtype=cd, device=hidden.device) if need_d_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_d_weight else None
    d_bias = None if bias is None else torch.zeros(v_local, dtype=cd, device=weight.device)
    valid, bad = _target_masks(targets, vocab_size, opts.ignore_index)
    # g: weight of the loss term per row (0 on ignored rows, NaN on out-of-range rows, as the op's loss)
    g = per_row(grad_loss.to(cd), valid, bad)
    row_weight = g if grad_lse is None else g + grad_lse.to(cd)
    if v_local > 0:
        step = _rows_per_chunk(n, v_local, hidden.device)
        for s in range(0, n, step):
            e = min(n, s + step)
            h = hidden[s:e].to(md)
            z, th = _local_logits(h, w, b, opts, cd)
            gs = g[s:e]
            dz = z.sub_(lse[s:e, None].to(cd)).exp_().mul_(row_weight[s:e, None])  # softmax * row weight
            local_t = targets[s:e] - start
            owned = (local_t >= 0) & (local_t < v_local)
            hit = torch.where(owned, -(1 - eps) * gs, torch.zeros_like(gs))
            dz.scatter_add_(1, local_t.clamp(0, v_local - 1)[:, None], hit[:, None])
            if eps:
                dz -= (gs * (eps / vocab_size))[:, None]
            through_epilogue_(dz, th, opts)
            if d_bias is not None:
                d_bias += dz.sum(dim=0)
            dzm = dz.to(md)  # the matmul dtype (eager's logits gradient is in the logits' dtype too)
            if d_hidden is not None:
                d_hidden[s:e] = dzm @ w
            if d_weight is not None:
                d_weight += dzm.T @ h
    if d_hidden is not None:
        dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=pg)
        d_hidden = d_hidden.to(hidden.dtype)
    return (d_hidden, None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype))


# ---------------------------------------------------------------------------------------------
# The custom ops and their autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("cce::vocab_parallel_forward", mutates_args=())
def vocab_parallel_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                           vocab_start: int, vocab_size: int, group_name: str, ignore_index: int,
                           label_smoothing: float, softcap: Optional[float],
                           logit_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token (loss, lse, saved lse) [N] over the whole vocabulary, equal on every rank of the group; float32
    (float64 for float64 inputs). ``weight``/``bias`` are this rank's rows; ``vocab_start = -1`` means the
    ``torch.chunk`` / DTensor ``Shard(0)`` layout by group rank. The third output is a copy of lse that only
    the autograd formula keeps (a returned lse may be written in place by the caller: see
    ``cce_inductor.ops.low_memory``)."""
    with autocast_off(hidden):
        loss, lse = forward(hidden, weight, bias, targets, vocab_start, vocab_size, resolve_group(group_name),
                            LossOptions(ignore_index, label_smoothing, softcap, logit_scale))
    return loss, lse, lse.clone()


@vocab_parallel_forward.register_fake
def _(hidden, weight, bias, targets, vocab_start, vocab_size, group_name, ignore_index, label_smoothing, softcap,
      logit_scale):
    n, dtype = hidden.shape[0], stat_dtype(hidden)
    return hidden.new_empty(n, dtype=dtype), hidden.new_empty(n, dtype=dtype), hidden.new_empty(n, dtype=dtype)


@torch.library.custom_op("cce::vocab_parallel_backward", mutates_args=())
def vocab_parallel_backward(grad_loss: Optional[Tensor], grad_lse: Optional[Tensor], hidden: Tensor,
                            weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                            vocab_start: int, vocab_size: int, group_name: str, ignore_index: int,
                            label_smoothing: float, softcap: Optional[float], logit_scale: float,
                            need_d_hidden: bool, need_d_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d_hidden summed over the group, local d_weight, local d_bias); an output not needed (or the bias
    gradient without a bias) is an empty tensor."""
    stat = stat_dtype(hidden)
    if grad_loss is None:  # only the lse was used (a z-loss alone)
        grad_loss = hidden.new_zeros(hidden.shape[0], dtype=stat)
    with autocast_off(hidden):
        d_hidden, d_weight, d_bias = backward(
            grad_loss.to(stat), None if grad_lse is None else grad_lse.to(stat), hidden, weight, bias, targets,
            lse, vocab_start, vocab_size, resolve_group(group_name),
            LossOptions(ignore_index, label_smoothing, softcap, logit_scale), need_d_hidden=need_d_hidden,
            need_d_weight=need_d_weight)
    empty = hidden.new_empty(0)
    return (empty if d_hidden is None else d_hidden, empty if d_weight is None else d_weight,
            empty if d_bias is None else d_bias)


@vocab_parallel_backward.register_fake
def _(grad_loss, grad_lse, hidden, weight, bias, targets, lse, vocab_start, vocab_size, group_name, ignore_index,
      label_smoothing, softcap, logit_scale, need_d_hidden, need_d_weight):
    d_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_d_hidden else hidden.new_empty(0)
    d_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_d_weight else hidden.new_empty(0)
    d_b = hidden.new_empty(0) if bias is None else torch.empty_like(bias)
    return d_h, d_w, d_b


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, *args = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[2])
    ctx.loss_args = tuple(args)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_lse, _grad_saved_lse=None):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    n_args = 4 + len(ctx.loss_args)
    if grad_loss is None and grad_lse is None:
        return (None,) * n_args
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = bias is not None and ctx.needs_input_grad[2]
    d_h, d_w, d_b = vocab_parallel_backward(grad_loss, grad_lse, hidden, weight, bias, targets, lse,
                                            *ctx.loss_args, need_d_hidden=need_h, need_d_weight=need_w)
    return (d_h if need_h else None, d_w if need_w else None, d_b if need_b else None) + (None,) * (n_args - 3)


vocab_parallel_forward.register_autograd(_backward, setup_context=_setup_context)
