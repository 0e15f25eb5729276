"""The fast path's Triton kernels (row kernel, accumulate kernel, chunked no-grad forward) vs float64,
under the Triton interpreter on CPU tensors (small shapes, several chunks)."""
import pytest
import torch

from cce_inductor.kernels.accumulate import accumulate_matmul, new_remainder
from cce_inductor.kernels.config import INTERPRETER_CONFIG, Tile
from cce_inductor.kernels.fast import triton_chunked_forward, triton_fast_forward
from cce_inductor.options import LossOptions
from cce_inductor.reference import reference_loss_and_grads, rel_err
from cce_inductor.torch_impl import fast as fast_torch

from helpers import OPTION_CASES, dtype_params, needs_interpreter, poison  # noqa: F401  (poison: a fixture)
from helpers import kernel_inputs as make_inputs

pytestmark = needs_interpreter

# 16-bit tolerances: the logits are a 16-bit matmul output (as eager's are) and the gradients 16-bit.
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
LOSS_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def check_fast(h, w, b, t, opts, reduction, tokens, remainder, need=(True, True, True), tol=None,
               cfg=INTERPRETER_CONFIG):
    N = h.shape[0]
    loss, dh, dw, db = triton_fast_forward(h, w, b, t, opts, reduction=reduction, tokens_per_chunk=tokens,
                                           remainder=remainder, need_d_hidden=need[0], need_d_weight=need[1],
                                           need_d_bias=need[2], config=cfg)
    count = (t != opts.ignore_index).sum().item()
    coef = 1.0 / count if reduction == "mean" else 1.0
    rl, _, rdh, rdw, rdb = reference_loss_and_grads(h, w, b, t, opts, torch.full((N,), coef, dtype=torch.float64))
    ref_loss = rl.sum() * coef
    assert loss.shape == () and loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= LOSS_TOL[h.dtype] * (abs(ref_loss.item()) + 1)
    tol = tol or GRAD_TOL[h.dtype]
    if need[0]:
        assert dh.shape == h.shape and dh.dtype == h.dtype and not dh.isnan().any()
        assert rel_err(dh, rdh) < tol, rel_err(dh, rdh)
    else:
        assert dh is None
    if need[1]:
        assert dw.shape == w.shape and dw.dtype == w.dtype and not dw.isnan().any()
        assert rel_err(dw, rdw) < tol, rel_err(dw, rdw)
    else:
        assert dw is None
    if b is not None and need[2]:
        assert db.dtype == torch.float32 and rel_err(db, rdb) < tol, rel_err(db, rdb)
    return loss, dh, dw, db


@pytest.mark.parametrize("dtype", dtype_params("fp32", "fp16", "bf16", quick=("bf16",)))
@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("reduction", ["mean", pytest.param("sum", marks=pytest.mark.slow)])
def test_fast_forward_matches_float64(dtype, case, reduction, poison):
    has_bias, opts = OPTION_CASES[case]
    gen = torch.Generator().manual_seed(11 + list(OPTION_CASES).index(case))
    N, D, V = 37, 40, 70  # nothing a multiple of the 16-wide blocks
    h, w, b, t = make_inputs(N, D, V, dtype, has_bias, gen)
    t[[3, 11]] = opts.ignore_index
    # Every accumulator format with every option is the costly part under the interpreter: fp32 and int8 with
    # the all-options case, int4 with the others (and every format, "float" too, in the test below).
    remainders = (["int8"] if dtype == torch.float32 else
                  ["fp32", "int8"] if case == "bias-smooth-softcap-scale" else ["int4"])
    for rem in remainders:
        check_fast(h, w, b, t, opts, reduction, tokens=8, remainder=rem)  # 5 chunks, last one partial
    check_fast(h, w, b, t, opts, reduction, tokens=N, remainder="int4")  # one chunk: cuBLAS writes d_weight


@pytest.mark.parametrize("dtype", dtype_params("bf16", "fp16"))
def test_weight_remainder_keeps_the_fp32_sum(dtype, poison):
    """d_weight over 6 token chunks with a remainder is as exact (vs float64) as one chunk (one rounding of
    the fp32 sum). (That plain 16-bit accumulation is worse is shown at the kernel level below.)"""
    gen = torch.Generator().manual_seed(21)
    N, D, V = 48, 20, 34
    h, w, _, t = make_inputs(N, D, V, dtype, False, gen, logit_std=1.0)
    opts = LossOptions()
    ref = reference_loss_and_grads(h, w, None, t, opts, torch.ones(N, dtype=torch.float64))[3]
    run = lambda hh, tt, tokens, rem: triton_fast_forward(  # noqa: E731
        hh, w, None, tt, opts, reduction="sum", tokens_per_chunk=tokens, remainder=rem, config=INTERPRETER_CONFIG)[2]
    err = {"one": rel_err(run(h, t, N, "int8"), ref)}
    for rem in ("fp32", "int8", "int4", "float"):
        err[rem] = rel_err(run(h, t, 8, rem), ref)
    assert max(err["fp32"], err["int8"], err["float"]) < 1.1 * err["one"] and err["int4"] < 1.25 * err["one"], err


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> 16-bit to nearest even, as the kernels convert (kernels/common.py: to_rne)."""
    return x.float().to(dtype)


@pytest.mark.parametrize("lo_mode", ["none", "int8", "int4", "float"])
@pytest.mark.parametrize("dtype", dtype_params("bf16", "fp16", "fp32"))
def test_accumulate_kernel_with_transposed_and_strided_operands(lo_mode, dtype, poison):
    """hi(+lo) over several passes equals the single conversion of the exact sum to hi's dtype (up to the
    remainder's resolution); without a remainder ("none") every pass rounds and the error is visibly larger."""
    if dtype == torch.float32 and lo_mode != "none":
        pytest.skip("fp32 accumulates without a remainder")
    gen = torch.Generator().manual_seed(5)
    M, N, K, passes = 45, 27, 19, 6  # odd N: the int4 remainder's last byte holds one value
    hi = torch.full((M, N), float("nan"), dtype=dtype)
    lo = new_remainder(M, N, lo_mode, dtype, "cpu") if lo_mode != "none" else None
    total = torch.zeros(M, N, dtype=torch.float64)
    tile = Tile(16, 16, 16)
    for p in range(passes):
        a_store = torch.randn(K, M + 3, generator=gen).to(dtype)
        a = a_store[:, 1:1 + M].t()  # transposed view with a column offset: strides (1, M + 3)
        b = torch.randn(K, 2 * N, generator=gen).to(dtype)[:, ::2]  # column stride 2
        accumulate_matmul(a, b, hi, lo, first=p == 0, last=p == passes - 1, lo_mode=lo_mode,
                          tile=tile, upcast=True, dot_precision="ieee")
        total += a.double() @ b.double()
    assert not hi.isnan().any()
    if dtype == torch.float32:
        assert rel_err(hi, total) < 1e-6
        return
    once = _round(total, dtype).double()  # one conversion of the exact sum, as the kernel converts
    err = rel_err(hi, once)
    share = (hi.double() != once).double().mean().item()
    ulp_rel = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
    # Measured (seed 5): share of elements off the single conversion / relative error in units of ulp_rel:
    # bf16 none 0.86 / 2.3, int8 0.01 / 0.05, int4 0.12 / 0.32, float 0.01 / 0.10;
    # fp16 none 0.48 / 0.88, int8 0.01 / 0.07, int4 0.11 / 0.28, float 0.001 / 0.00001.
    if lo_mode == "none":
        assert share > 0.3 and err > 0.5 * ulp_rel, (share, err / ulp_rel)  # each pass rounded
    else:
        limit = {"int8": (0.05, 0.15), "float": (0.05, 0.25), "int4": (0.3, 0.6)}[lo_mode]
        assert share < limit[0] and err < limit[1] * ulp_rel, (share, err / ulp_rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_chunked_no_grad_forward(dtype, case, poison):
    has_bias, opts = OPTION_CASES[case]
    gen = torch.Generator().manual_seed(31 + list(OPTION_CASES).index(case))
    N, D, V = 29, 24, 53
    h, w, b, t = make_inputs(N, D, V, dtype, has_bias, gen)
    t[[2, 7]] = opts.ignore_index
    t[9] = V + 2  # out of range: NaN loss for that row only
    loss, lse = triton_chunked_forward(h, w, b, t, opts, tokens_per_chunk=6, config=INTERPRETER_CONFIG)
    rl, rlse, *_ = reference_loss_and_grads(h, w, b, t, opts)
    ok = torch.ones(N, dtype=torch.bool)
    ok[9] = False
    assert torch.isnan(loss[9]) and not torch.isnan(loss[ok]).any() and not torch.isnan(lse).any()
    assert (loss[[2, 7]] == 0).all()
    tol = LOSS_TOL[dtype]
    assert rel_err(lse, rlse) < tol and rel_err(loss[ok], rl[ok]) < tol


def test_fp32_bias_with_16bit_inputs_added_in_fp32(poison):
    """A float32 bias with bf16 inputs is added by the row kernel in fp32 (as eager's type promotion)."""
    gen = torch.Generator().manual_seed(41)
    N, D, V = 19, 16, 45
    h, w, _, t = make_inputs(N, D, V, torch.bfloat16, False, gen)
    b = torch.randn(V, generator=gen) * 3.0 + 1e-3  # float32, not representable in bf16
    loss, dh, dw, db = check_fast(h, w, b, t, LossOptions(softcap=4.0), "mean", tokens=7, remainder="int4")
    loss_rounded = triton_fast_forward(h, w, b.bfloat16(), t, LossOptions(softcap=4.0), reduction="mean",
                                       tokens_per_chunk=7, remainder="int4", config=INTERPRETER_CONFIG)[0]
    assert loss.item() != loss_rounded.item()  # the fp32 bias was not rounded to bf16 on the way


def test_frozen_weight_and_no_hidden_grad(poison):
    gen = torch.Generator().manual_seed(51)
    h, w, b, t = make_inputs(21, 16, 33, torch.bfloat16, True, gen)
    check_fast(h, w, b, t, LossOptions(), "mean", tokens=5, remainder="int8", need=(True, False, True))
    check_fast(h, w, b, t, LossOptions(), "sum", tokens=5, remainder="int4", need=(False, True, False))


def test_tiny_and_out_of_range(poison):
    gen = torch.Generator().manual_seed(61)
    for dtype in (torch.float32, torch.bfloat16):
        h, w, b, t = make_inputs(1, 3, 2, dtype, True, gen)
        check_fast(h, w, b, t, LossOptions(softcap=5.0), "mean", tokens=1, remainder="int4")
    h, w, b, t = make_inputs(9, 16, 20, torch.float32, False, gen)
    t[4] = 20
    loss, dh, dw, _ = triton_fast_forward(h, w, None, t, LossOptions(), reduction="mean", tokens_per_chunk=4,
                                          remainder="int8", config=INTERPRETER_CONFIG)
    assert torch.isnan(loss) and dh[4].isnan().all() and not dh[[0, 1, 2, 3, 5, 6, 7, 8]].isnan().any()


def test_every_target_ignored_gives_nan_mean_and_zero_grads(poison):
    gen = torch.Generator().manual_seed(71)
    h, w, _, t = make_inputs(10, 16, 20, torch.bfloat16, False, gen)
    t[:] = -100
    loss, dh, dw, _ = triton_fast_forward(h, w, None, t, LossOptions(), reduction="mean", tokens_per_chunk=4,
                                          remainder="int4", config=INTERPRETER_CONFIG)
    assert torch.isnan(loss) and (dh == 0).all() and (dw == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_fast_path_matches_the_pytorch_one(dtype):
    """The PyTorch fast path (the CPU implementation) is the reference of the Triton one."""
    gen = torch.Generator().manual_seed(81)
    h, w, b, t = make_inputs(33, 24, 60, dtype, True, gen)
    t[5] = -100
    opts = LossOptions(label_smoothing=0.05, softcap=6.0)
    ours = triton_fast_forward(h, w, b, t, opts, reduction="mean", tokens_per_chunk=9, remainder="int4",
                               config=INTERPRETER_CONFIG)
    torch_path = fast_torch.forward(h, w, b, t, opts, "mean", tokens_per_chunk=7)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for a, r in zip(ours, torch_path):
        assert rel_err(a, r.double()) < tol


def test_accumulate_falls_back_to_a_smaller_tile_on_out_of_resources(monkeypatch):
    """A tile whose launch runs out of resources on this device is replaced by the next smaller one."""
    from triton.runtime.errors import OutOfResources

    from cce_inductor.kernels import accumulate as acc

    real, seen = acc._launch, []

    def launch(*args):
        tile = args[13]
        seen.append((tile.block_m, tile.block_n))
        if tile.block_n >= 128:
            raise OutOfResources(300000, 232448, "shared memory")
        return real(*args)

    monkeypatch.setattr(acc, "_launch", launch)
    monkeypatch.setattr(acc, "_WORKING_TILE", {})
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(20, 8, generator=gen), torch.randn(8, 12, generator=gen)
    hi = torch.full((20, 12), float("nan"))
    big = Tile(128, 256, 64, num_warps=8, num_stages=3)
    acc.accumulate_matmul(a, b, hi, None, first=True, last=True, lo_mode="none", tile=big, upcast=True,
                          dot_precision="ieee")
    assert seen[0] == (128, 256) and seen[-1][1] < 128
    torch.testing.assert_close(hi, a @ b, rtol=1e-5, atol=1e-5)
    seen.clear()
    acc.accumulate_matmul(a, b, hi, None, first=True, last=True, lo_mode="none", tile=big, upcast=True,
                          dot_precision="ieee")
    assert len(seen) == 1 and seen[0][1] < 128  # the working tile is remembered


@pytest.mark.parametrize("dtype", dtype_params("bf16", "fp16"))
@pytest.mark.parametrize("remainder", ["int8", pytest.param("int4", marks=pytest.mark.slow)])
def test_cublas_fold_scheme_matches_float64(dtype, remainder, poison):
    """The d_weight accumulator filled by float32 products (cuBLAS on a GPU, an upcast matmul here) folded
    into hi + remainder, in several vocabulary slabs per chunk: every option, as exact as the Triton scheme."""
    has_bias, opts = OPTION_CASES["bias-smooth-softcap-scale"]
    gen = torch.Generator().manual_seed(31)
    N, D, V = 37, 40, 70
    h, w, b, t = make_inputs(N, D, V, dtype, has_bias, gen)
    # 16 rows of 40 fp32 per slab: 5 slabs over V = 70, the last one partial
    cfg = INTERPRETER_CONFIG.with_(weight_accumulate="cublas_fold", fold_slab_bytes=16 * 40 * 4)
    for reduction in ("mean", "sum"):
        check_fast(h, w, b, t, opts, reduction, tokens=8, remainder=remainder, cfg=cfg)


def test_fold_fp32_equals_the_fused_epilogue(poison):
    """fold_fp32(p) leaves hi and lo exactly as accumulate_matmul's epilogue does for the same product."""
    from cce_inductor.kernels.accumulate import fold_fp32

    gen = torch.Generator().manual_seed(32)
    M, K, N = 33, 24, 50
    a = torch.randn(M, K, generator=gen).bfloat16()
    b = torch.randn(K, N, generator=gen).bfloat16()
    for mode in ("int8", "int4"):
        hi1, hi2 = torch.empty(M, N, dtype=torch.bfloat16), torch.empty(M, N, dtype=torch.bfloat16)
        lo1, lo2 = new_remainder(M, N, mode, torch.bfloat16, "cpu"), new_remainder(M, N, mode, torch.bfloat16, "cpu")
        for first, last in ((True, False), (False, False), (False, True)):
            accumulate_matmul(a, b, hi1, lo1, first=first, last=last, lo_mode=mode,
                              tile=INTERPRETER_CONFIG.accumulate_tile, upcast=True, dot_precision="ieee")
            fold_fp32(a.float() @ b.float(), hi2, lo2, first=first, last=last, lo_mode=mode)
            assert torch.equal(hi1, hi2), (mode, first, last)
            if not last:
                assert torch.equal(lo1, lo2), (mode, first, last)


@pytest.mark.parametrize("dtype", dtype_params("bf16", "fp16", "fp32"))
def test_scale_in_place_rounds_once(dtype):
    """The eager backward's scaling kernel: ``d *= g`` computed in float32 and rounded once to d's dtype,
    bit for bit what the PyTorch implementation gives (also over more than one program's block)."""
    from cce_inductor.kernels.scale import SCALE_BLOCK, scale_in_place
    from cce_inductor.torch_impl.common import scale_in_place as torch_scale_in_place

    gen = torch.Generator().manual_seed(5)
    d = (torch.randn(3, SCALE_BLOCK // 2 + 7, generator=gen) * 3).to(dtype)
    d[0, 0] = float("nan")
    g = torch.tensor(1 / 3)
    want = torch_scale_in_place(d.clone(), g)
    got = scale_in_place(d.clone(), g)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    if dtype != torch.float32:  # what a plain 16-bit mul_ gives (g rounded to 16 bits first) differs
        assert not torch.equal(want.nan_to_num(), d.float().mul(g.to(dtype).float()).to(dtype).nan_to_num())
