"""The vocabulary-parallel op (``cce::vocab_parallel_*``) on 2 gloo processes against the float64
single-process reference: every option, uneven and empty shards, several token chunks, the DTensor entry,
torch.compile (fullgraph) and opcheck."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from _dist_util import WorkerPool
from helpers import float64_reference, loss_and_grads, make_inputs, option_grid, rel_err
from helpers import reference_linear_cross_entropy as reference_lce

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def workers():
    with WorkerPool(2) as pool:
        yield pool


def _shard(t, rank, world):
    """This rank's rows of t, as torch.chunk / DTensor Shard(0) split them (possibly empty)."""
    from cce_inductor.distributed import chunk_layout_start

    start, rows = chunk_layout_start(t.shape[0], world, rank)
    return t.detach()[start:start + rows].clone().requires_grad_(t.requires_grad), start, rows


def _vp_loss_and_grads(rank, world, hidden, weight, bias, targets, device="cpu", **kw):
    """Loss, lse and gradients of the vocabulary-parallel op on this rank (plain-tensor entry), on the CPU."""
    from cce_inductor.distributed import vocab_parallel_linear_cross_entropy

    def dev(t):
        return None if t is None else t.detach().to(device).requires_grad_(t.requires_grad)

    w_local, start, rows = _shard(weight, rank, world)
    b_local = None if bias is None else _shard(bias, rank, world)[0]
    h, w_local, b_local = dev(hidden), dev(w_local), dev(b_local)

    def fn(h, w, t, bias=None, **kw):
        return vocab_parallel_linear_cross_entropy(h, w, t.to(device), bias=bias, vocab_size=weight.shape[0], **kw)

    loss, lse, grads = loss_and_grads(fn, h, w_local, b_local, targets, **kw)
    cpu = (lambda t: None if t is None else t.cpu())  # noqa: E731
    return cpu(loss), cpu(lse), tuple(cpu(g) for g in grads), (start, rows)


def _compare(tag, got, ref, tol, failures):
    if got is None and ref is None:
        return
    if got.numel() == 0 and ref.numel() == 0:
        return
    if torch.isnan(ref).any() or torch.isnan(got).any():
        if not torch.equal(torch.isnan(got), torch.isnan(ref)):
            failures.append(f"{tag}: NaN pattern differs")
        got, ref = got[~torch.isnan(got)], ref[~torch.isnan(ref)]
        if ref.numel() == 0:
            return
    e = rel_err(got, ref)
    if not e <= tol:
        failures.append(f"{tag}: rel err {e:.3g} > {tol:g}")


def _check_case(rank, world, tag, dtype, tol, shape, d, v, *, bias, failures, seed=0, device="cpu", bias_dtype=None,
                **kw):
    hidden, weight, b, targets = make_inputs(shape, d, v, dtype, bias=bias, seed=seed, scale=4.0)
    if bias_dtype is not None:  # e.g. a float32 bias with bf16 hidden/weight (added in float32, as eager does)
        b = b.detach().to(bias_dtype).requires_grad_()
    if "ignore_index" in kw:  # the ignored tokens carry the custom ignore_index
        targets[targets == -100] = kw["ignore_index"]
    loss, lse, grads, (start, rows) = _vp_loss_and_grads(rank, world, hidden, weight, b, targets, device, **kw)
    r_loss, r_lse, r_grads = float64_reference(hidden, weight, b, targets, **kw)
    _compare(f"{tag} loss", loss, r_loss, tol, failures)
    if kw.get("return_lse"):
        _compare(f"{tag} lse", lse, r_lse, tol, failures)
    _compare(f"{tag} d_hidden", grads[0], r_grads[0], tol, failures)
    _compare(f"{tag} d_weight", grads[1], r_grads[1][start:start + rows], tol, failures)
    if b is not None:
        _compare(f"{tag} d_bias", grads[2], r_grads[2][start:start + rows], tol, failures)
    if loss.dtype != (torch.float64 if dtype == torch.float64 else torch.float32):
        failures.append(f"{tag}: loss dtype {loss.dtype}")
    if grads[0].dtype != dtype or grads[1].dtype != dtype or (b is not None and grads[2].dtype != b.dtype):
        failures.append(f"{tag}: gradient dtypes {[g.dtype for g in grads if g is not None]}")


def _grid_worker(rank, world, device="cpu"):
    """Every option combination in float64 (tight), a float32 and a bf16 subset, V split unevenly."""
    import functools

    torch.manual_seed(0)
    failures = []
    check = functools.partial(_check_case, device=device)
    for i, kw in enumerate(option_grid()):
        kw = dict(kw)
        bias = kw.pop("bias")
        check(rank, world, f"f64 {kw} bias={bias}", torch.float64, 1e-10, (2, 7), 12, 37, bias=bias,
              failures=failures, seed=i, **kw)
    for i, (bias, red, ls, cap) in enumerate(itertools.product([False, True], ["mean", "none"], [0.0, 0.2],
                                                               [None, 2.5])):
        kw = dict(reduction=red, label_smoothing=ls, softcap=cap, logit_scale=1.3, return_lse=True)
        check(rank, world, f"f32 {kw} bias={bias}", torch.float32, 2e-5, (3, 5), 16, 53, bias=bias,
                    failures=failures, seed=100 + i, **kw)
    for red in ("mean", "sum"):
        check(rank, world, f"bf16 {red}", torch.bfloat16, 2e-2, (4, 8), 32, 64, bias=True,
                    failures=failures, seed=7, reduction=red, label_smoothing=0.1)
    check(rank, world, "bf16, float32 bias", torch.bfloat16, 2e-2, (4, 8), 32, 64, bias=True, bias_dtype=torch.float32,
          failures=failures, seed=8, softcap=3.0)
    # a custom ignore_index that is also a valid class id, and no ignored tokens at all
    check(rank, world, "ignore_index=3", torch.float64, 1e-10, (2, 9), 8, 11, bias=False,
                failures=failures, seed=3, ignore_index=3)
    check(rank, world, "plain backward", torch.float64, 1e-10, (10,), 8, 11, bias=True,
                failures=failures, seed=4, upstream_seed=None)
    return failures


def test_every_option_matches_float64_reference(workers):
    results = workers.run(_grid_worker)
    for failures in results:
        assert not failures, "\n".join(failures[:20])


def _edge_worker(rank, world):
    import cce_inductor.distributed.vocab_parallel as vp
    from cce_inductor.distributed import vocab_parallel_linear_cross_entropy

    failures = []
    # several token chunks on the CPU (tiny chunk budget), uneven shards
    old = dict(vp.CHUNK_ELEMENTS)
    vp.CHUNK_ELEMENTS["cpu"] = 40
    try:
        _check_case(rank, world, "chunks", torch.float64, 1e-10, (3, 11), 8, 23, bias=True, failures=failures,
                    seed=5, label_smoothing=0.1, softcap=4.0, return_lse=True, reduction="none")
    finally:
        vp.CHUNK_ELEMENTS.clear()
        vp.CHUNK_ELEMENTS.update(old)
    # 16-bit matmuls (what runs on a GPU for bf16 inputs), exercised on the CPU
    real = vp._matmul_dtype
    vp._matmul_dtype = lambda h: h.dtype
    try:
        _check_case(rank, world, "bf16 matmuls", torch.bfloat16, 2e-2, (4, 8), 32, 64, bias=True,
                    failures=failures, seed=16, label_smoothing=0.1, softcap=5.0, logit_scale=0.8, return_lse=True)
    finally:
        vp._matmul_dtype = real
    # V = 1 over 2 ranks: rank 1 holds no rows (its local max is -inf, its sum-exp 0)
    _check_case(rank, world, "empty shard", torch.float64, 1e-10, (6,), 4, 1, bias=True, failures=failures,
                seed=6, ignore_index=-1, label_smoothing=0.3, return_lse=True)
    # V = 3 over 2 ranks: 2 + 1 rows
    _check_case(rank, world, "V=3", torch.float64, 1e-10, (6,), 4, 3, bias=False, failures=failures, seed=8)
    # every token ignored: mean is nan (0/0) as in eager, gradients zero
    hidden, weight, _, targets = make_inputs((5,), 4, 9, torch.float64, seed=9)
    targets.fill_(-100)
    loss, _, grads, _ = _vp_loss_and_grads(rank, world, hidden, weight, None, targets, upstream_seed=None)
    if not torch.isnan(loss) or grads[0].abs().sum() != 0 or grads[1].abs().sum() != 0:
        failures.append(f"all ignored: loss {loss}, grad sums {grads[0].abs().sum()}, {grads[1].abs().sum()}")
    # an out-of-range label: an error in eager mode; with the check off (as under torch.compile) a NaN loss
    hidden, weight, _, targets = make_inputs((5,), 4, 9, torch.float64, seed=10, ignore_frac=0.0)
    targets[2] = 9
    w_local = _shard(weight, rank, world)[0]
    try:
        vocab_parallel_linear_cross_entropy(hidden, w_local, targets, vocab_size=9)
        failures.append("out-of-range label did not raise")
    except ValueError as e:
        if "outside the vocabulary" not in str(e):
            failures.append(f"wrong error: {e}")
    import os

    os.environ["CCE_INDUCTOR_CHECK_TARGETS"] = "0"
    try:
        per_tok = vocab_parallel_linear_cross_entropy(hidden, w_local, targets, vocab_size=9, reduction="none")
    finally:
        del os.environ["CCE_INDUCTOR_CHECK_TARGETS"]
    if not (torch.isnan(per_tok[2]) and torch.isfinite(per_tok[[0, 1, 3, 4]]).all()):
        failures.append(f"out-of-range label: {per_tok}")
    # wrong layout: the local rows do not match the chunk layout of vocab_size
    try:
        vocab_parallel_linear_cross_entropy(hidden, weight[:3], targets.clamp(0, 8), vocab_size=9)
        failures.append("a shard of the wrong size did not raise")
    except ValueError as e:
        if "vocab_start" not in str(e):
            failures.append(f"wrong error for a wrong shard: {e}")
    # an explicit vocab_start (Megatron style, rank-major even split)
    _h, _w, _b, _t = make_inputs((2, 5), 6, 10, torch.float64, bias=True, seed=11)
    w_local = _w.detach()[rank * 5:(rank + 1) * 5].clone().requires_grad_()
    b_local = _b.detach()[rank * 5:(rank + 1) * 5].clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(_h, w_local, _t, bias=b_local, vocab_size=10, vocab_start=rank * 5,
                                               group=dist.group.WORLD, label_smoothing=0.2)
    ref, _, _ = float64_reference(_h, _w, _b, _t, label_smoothing=0.2, upstream_seed=None)
    _compare("vocab_start", loss, ref, 1e-10, failures)
    return failures


def test_edges_chunks_empty_shard_nan_and_errors(workers):
    for failures in workers.run(_edge_worker):
        assert not failures, "\n".join(failures)


def _dtensor_worker(rank, world):
    """The DTensor entry through cce_inductor.linear_cross_entropy: Shard(0) weight/bias, hidden Replicate
    (and Shard(0) on tokens, redistributed), grads come back as DTensors with the weight's placements."""
    import cce_inductor
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    failures = []
    for h_place, kw in (((Replicate(),), dict(reduction="mean", label_smoothing=0.1, softcap=5.0)),
                        ((Shard(0),), dict(reduction="none", return_lse=True, logit_scale=0.5))):
        hidden, weight, bias, targets = make_inputs((4, 6), 8, 29, torch.float64, bias=True, seed=12)
        r_loss, r_lse, r_grads = float64_reference(hidden, weight, bias, targets, **kw)
        h = distribute_tensor(hidden.detach(), mesh, h_place).requires_grad_()
        w = distribute_tensor(weight.detach(), mesh, (Shard(0),)).requires_grad_()
        b = distribute_tensor(bias.detach(), mesh, (Shard(0),)).requires_grad_()
        out = cce_inductor.linear_cross_entropy(h, w, targets, bias=b, **kw)
        loss, lse = out if isinstance(out, tuple) else (out, None)
        if not isinstance(loss, DTensor) or tuple(loss.placements) != (Replicate(),):
            failures.append(f"{h_place}: loss is {type(loss).__name__} {getattr(loss, 'placements', None)}")
        g = torch.Generator().manual_seed(1)  # the same upstream as loss_and_grads
        total = (loss.to_local() * torch.randn(loss.shape, generator=g, dtype=torch.float64)).sum()
        if lse is not None:
            total = total + (lse.to_local() * torch.randn(lse.shape, generator=g, dtype=torch.float64)).sum()
        total.backward()
        _compare(f"{h_place} loss", loss.to_local(), r_loss, 1e-10, failures)
        if lse is not None:
            _compare(f"{h_place} lse", lse.to_local(), r_lse, 1e-10, failures)
        for name, p, r in (("hidden", h, r_grads[0]), ("weight", w, r_grads[1]), ("bias", b, r_grads[2])):
            if not isinstance(p.grad, DTensor) or p.grad.placements != p.placements:
                failures.append(f"{h_place} {name}.grad placements {getattr(p.grad, 'placements', None)}")
            _compare(f"{h_place} d_{name}", p.grad.full_tensor(), r, 1e-10, failures)
    # a plain hidden with a Shard(0) weight is ambiguous (FSDP2 shards parameters that way too): refused
    hidden, weight, _, targets = make_inputs((4,), 8, 10, torch.float64, seed=13)
    w = distribute_tensor(weight.detach(), mesh, (Shard(0),))
    try:
        cce_inductor.linear_cross_entropy(hidden, w, targets)
        failures.append("plain hidden + Shard(0) weight did not raise")
    except TypeError as e:
        if "ambiguous" not in str(e):
            failures.append(f"wrong error: {e}")
    # ... unless the caller says hidden is replicated, with the explicit entry
    loss = cce_inductor.vocab_parallel_linear_cross_entropy(hidden, w, targets)
    _compare("explicit plain hidden", loss, float64_reference(hidden, weight, None, targets,
                                                             upstream_seed=None)[0], 1e-10, failures)
    # Shard(1) (a row-parallel lm-head) is not vocabulary sharding
    try:
        cce_inductor.linear_cross_entropy(distribute_tensor(hidden.detach(), mesh, (Replicate(),)),
                                          distribute_tensor(weight.detach(), mesh, (Shard(1),)), targets)
        failures.append("Shard(1) weight did not raise")
    except TypeError as e:
        if "Shard(dim=1)" not in str(e):
            failures.append(f"wrong error for Shard(1): {e}")
    hd = distribute_tensor(hidden.detach(), mesh, (Replicate(),))
    # path= is checked (the vocabulary-parallel op has one scheme), not silently dropped
    try:
        cce_inductor.linear_cross_entropy(hd, w, targets, path="bogus")
        failures.append("path='bogus' did not raise")
    except ValueError as e:
        if "path must be one of" not in str(e):
            failures.append(f"wrong error for path='bogus': {e}")
    # DTensor targets with a plain weight: the DTensor entry's clear error, not a dispatch error
    try:
        cce_inductor.linear_cross_entropy(hidden, weight, distribute_tensor(targets, mesh, (Replicate(),)))
        failures.append("DTensor targets with a plain weight did not raise")
    except TypeError as e:
        if "the weight is not" not in str(e):
            failures.append(f"wrong error for DTensor targets: {e}")
    # a float32 bias with bf16 hidden/weight is accepted and added in float32 (F.linear(h, w) + b; compared
    # with the float64 value of that expression: the op's logits are not rounded to bf16 before the add)
    h16, w16, b32, t16 = make_inputs((5,), 8, 29, torch.bfloat16, bias=True, seed=16)
    b32 = b32.detach().float()
    got = cce_inductor.linear_cross_entropy(distribute_tensor(h16.detach(), mesh, (Replicate(),)),
                                            distribute_tensor(w16.detach(), mesh, (Shard(0),)), t16,
                                            bias=distribute_tensor(b32, mesh, (Shard(0),)))
    want = torch.nn.functional.cross_entropy(h16.detach().double() @ w16.detach().double().T + b32.double(), t16)
    _compare("bf16 + float32 bias", got.to_local(), want, 1e-5, failures)
    # per-token log-probabilities of a sharded lm-head: the vocabulary-parallel op (its loss, negated); the entropy
    # output is not computed there: a clear error
    hidden, weight, _, targets = make_inputs((2, 3), 8, 29, torch.float64, seed=17, ignore_frac=0.0)
    hd = distribute_tensor(hidden.detach(), mesh, (Replicate(),))
    wd = distribute_tensor(weight.detach(), mesh, (Shard(0),))
    logp = cce_inductor.linear_log_probs(hd, wd, targets)
    want = -torch.nn.functional.cross_entropy((hidden @ weight.T).transpose(1, 2), targets, reduction="none")
    _compare("DTensor log-probabilities", logp.to_local(), want, 1e-10, failures)
    try:
        cce_inductor.linear_log_probs(hd, wd, targets, return_entropy=True)
        failures.append("return_entropy with a DTensor lm-head did not raise")
    except NotImplementedError as e:
        if "vocabulary-sharded" not in str(e):
            failures.append(f"wrong error for return_entropy: {e}")
    return failures


def test_dtensor_entry(workers):
    for failures in workers.run(_dtensor_worker):
        assert not failures, "\n".join(failures)


def _compile_worker(rank, world, backend):
    """torch.compile(fullgraph=True) of both entries: no graph break, the cce op in the graph, same numbers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import cce_inductor

    failures = []
    hidden, weight, bias, targets = make_inputs((2, 6), 8, 21, torch.float32, bias=True, seed=14)
    kw = dict(label_smoothing=0.1, softcap=4.0, return_lse=True)
    r_loss, r_lse, r_grads = float64_reference(hidden, weight, bias, targets, **kw)
    w_local, start, rows = _shard(weight, rank, world)
    b_local = _shard(bias, rank, world)[0]
    pg = dist.group.WORLD

    def plain(h, w, t, b):
        return cce_inductor.vocab_parallel_linear_cross_entropy(h, w, t, bias=b, vocab_size=21, group=pg, **kw)

    seen = []

    def counting_backend(gm, ex):
        seen.append(sum(1 for n in gm.graph.nodes if "vocab_parallel" in str(n.target)))
        return torch._dynamo.lookup_backend(backend)(gm, ex)

    h = hidden.detach().clone().requires_grad_()
    compiled_plain = torch.compile(plain, backend=counting_backend, fullgraph=True)
    loss, lse = compiled_plain(h, w_local, targets, b_local)
    (loss + (lse * torch.linspace(-1, 1, lse.numel()).view_as(lse)).sum()).backward()
    up = torch.linspace(-1, 1, r_lse.numel(), dtype=torch.float64).view_as(r_lse)
    ref_h, ref_w, ref_b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    rl, rlse = reference_lce(ref_h, ref_w, targets, bias=ref_b, **kw)
    (rl + (rlse * up).sum()).backward()
    _compare("compiled plain loss", loss, r_loss, 2e-5, failures)
    _compare("compiled plain lse", lse, r_lse, 2e-5, failures)
    _compare("compiled plain d_hidden", h.grad, ref_h.grad, 2e-5, failures)
    _compare("compiled plain d_weight", w_local.grad, ref_w.grad[start:start + rows], 2e-5, failures)
    _compare("compiled plain d_bias", b_local.grad, ref_b.grad[start:start + rows], 2e-5, failures)
    # other sequence lengths: one more compile (dynamic shapes), then none; the numbers still right
    for t_len in (9, 4):
        hh, ww, bb, tt = make_inputs((2, t_len), 8, 21, torch.float32, bias=True, seed=14)
        got = compiled_plain(hh.detach(), ww.detach()[start:start + rows], tt, bb.detach()[start:start + rows])[0]
        _compare(f"compiled plain loss, T={t_len}", got, float64_reference(hh, ww, bb, tt, upstream_seed=None,
                                                                           **kw)[0], 2e-5, failures)
    if seen != [1, 1]:
        failures.append(f"plain entry: graphs / cce nodes {seen} (expected one recompile for dynamic shapes)")

    mesh = init_device_mesh("cpu", (world,))
    torch._dynamo.reset()
    seen.clear()
    hd = distribute_tensor(hidden.detach(), mesh, (Replicate(),)).requires_grad_()
    wd = distribute_tensor(weight.detach(), mesh, (Shard(0),)).requires_grad_()

    def dt(h, w, t):
        return cce_inductor.linear_cross_entropy(h, w, t, reduction="sum", logit_scale=0.5)

    out = torch.compile(dt, backend=counting_backend, fullgraph=True)(hd, wd, targets)
    out.backward()
    ref_h, ref_w = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref = reference_lce(ref_h, ref_w, targets, reduction="sum", logit_scale=0.5)
    ref.backward()
    _compare("compiled DTensor loss", out.to_local(), ref, 2e-5, failures)
    _compare("compiled DTensor d_hidden", hd.grad.full_tensor(), ref_h.grad, 2e-5, failures)
    _compare("compiled DTensor d_weight", wd.grad.full_tensor(), ref_w.grad, 2e-5, failures)
    if seen != [1]:
        failures.append(f"DTensor entry: graphs / cce nodes {seen}")
    return failures


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(workers, backend):
    for failures in workers.run(_compile_worker, backend, timeout=240):
        assert not failures, "\n".join(failures)


def _opcheck_worker(rank, world):
    from torch.library import opcheck

    import cce_inductor.distributed  # noqa: F401

    hidden, weight, bias, targets = make_inputs((7,), 6, 13, torch.float32, bias=True, seed=15)
    w_local, _, _ = _shard(weight, rank, world)
    b_local, _, _ = _shard(bias, rank, world)
    name = dist.group.WORLD.group_name
    h = hidden.detach().requires_grad_()
    out = {}
    out["forward"] = opcheck(torch.ops.cce.vocab_parallel_forward.default,
                             (h, w_local, b_local, targets, -1, 13, name, -100, 0.1, 3.0, 1.5))
    lse = torch.ops.cce.vocab_parallel_forward(h, w_local, b_local, targets, -1, 13, name, -100, 0.1, 3.0, 1.5)[1]
    out["backward"] = opcheck(torch.ops.cce.vocab_parallel_backward.default,
                              (torch.randn(7), torch.randn(7), hidden.detach(), w_local.detach(), b_local.detach(),
                               targets, lse.detach(), -1, 13, name, -100, 0.1, 3.0, 1.5, True, True))
    return out


def test_opcheck(workers):
    for res in workers.run(_opcheck_worker):
        for which, r in res.items():
            assert all(v == "SUCCESS" for v in r.values()), (which, r)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="needs 2 CUDA GPUs and NCCL")
def test_every_option_on_two_gpus_nccl():
    """The option grid on 2 GPUs with NCCL (the op's chunked path on CUDA, NCCL all-reduces)."""
    with WorkerPool(2, backend="nccl") as pool:
        for failures in pool.run(_grid_worker, "cuda", timeout=300):
            assert not failures, "\n".join(failures[:20])
