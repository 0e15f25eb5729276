"""Triton kernels vs a float64 reference, under the Triton interpreter on CPU tensors (small shapes)."""
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings, strategies as st

from cce_inductor.kernels import KernelConfig, triton_backward, triton_forward
from cce_inductor.kernels.common import to_rne
from cce_inductor.kernels.config import INTERPRETER_CONFIG, chunk_width, forward_splits
from cce_inductor.options import LossOptions
from cce_inductor.reference import reference_linear_cross_entropy, reference_loss_and_grads, rel_err

from helpers import OPTION_CASES, dtype_params, fuzz_examples, needs_interpreter, poison  # noqa: F401  (a fixture)
from helpers import kernel_inputs as make_inputs

pytestmark = needs_interpreter

# Forces several vocab splits in the forward and several vocab chunks in the backward on tiny shapes.
SMALL = INTERPRETER_CONFIG.with_(splits=3, chunk_cols=32)

# Gradient tolerance per input dtype: draw is rounded to the input dtype (as eager does) and the outputs
# are 16-bit, so 16-bit errors sit near the dtype's epsilon; the forward has no rounding step (fp32
# accumulation of exactly-representable inputs) and is held to fp32 accuracy for every dtype.
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
FWD_TOL = 2e-5


def _eager_grad_errors(h, w, b, t, opts, g, gl, ref):
    """Eager PyTorch's own relative errors (vs the float64 ``ref``) of d_hidden, d_weight, d_bias in the
    inputs' dtype, for the same upstream gradients: the bound the project holds its gradients to."""
    params = [x.detach().clone().requires_grad_() for x in (h, w, b) if x is not None]
    hh, ww, bb = params[0], params[1], (params[2] if b is not None else None)
    loss, lse = reference_linear_cross_entropy(hh, ww, t, bias=bb, reduction="none", return_lse=True,
                                               ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing,
                                               softcap=opts.softcap, logit_scale=opts.logit_scale)
    total = (loss * g).sum() + ((lse * gl).sum() if gl is not None else 0)
    return [rel_err(x, r) for x, r in zip(torch.autograd.grad(total, params), ref)]


def run_and_check(h, w, b, t, opts, cfg, gen, with_glse=True, grad_tol=None, expect_nan_rows=(),
                  eager_bound=False):
    """Forward and backward kernels against float64. ``eager_bound``: a gradient may also be off by up to
    1.5x eager's own error in the same dtype (tiny degenerate shapes, where bf16 rounding of d(logits)
    dominates a cancelling sum for eager too)."""
    N = h.shape[0]
    loss, lse = triton_forward(h, w, b, t, opts, config=cfg)
    assert loss.shape == (N,) and lse.shape == (N,)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    g = torch.rand(N, generator=gen) + 0.5
    gl = torch.randn(N, generator=gen) if with_glse else None
    rl, rlse, rdh, rdw, rdb = reference_loss_and_grads(h, w, b, t, opts, g, gl)
    ok = torch.ones(N, dtype=torch.bool)
    for r in expect_nan_rows:
        ok[r] = False
        assert torch.isnan(loss[r]), "out-of-range target must give a NaN loss"
    assert not torch.isnan(loss[ok]).any() and not torch.isnan(lse).any()
    assert rel_err(lse, rlse) < FWD_TOL
    # loss = lse - z_t cancels when the loss is tiny: measure its error against the size of lse too.
    scale = rl[ok].norm() + rlse[ok].norm() + 1e-3 * N ** 0.5
    assert ((loss[ok].double() - rl[ok]).norm() / scale).item() < FWD_TOL
    dh, dw, db = triton_backward(g, gl, h, w, b, t, lse, opts, config=cfg)
    assert dh.shape == h.shape and dw.shape == w.shape and dh.dtype == h.dtype and dw.dtype == w.dtype
    assert dh.is_contiguous() and dw.is_contiguous()
    if b is None:
        assert db is None
    else:
        assert db.shape == b.shape and db.dtype == b.dtype
    if expect_nan_rows:
        return loss, dh, dw, db
    tol = grad_tol or GRAD_TOL[h.dtype]
    ours, refs = [dh, dw] + ([db] if b is not None else []), [rdh, rdw] + ([rdb] if b is not None else [])
    bounds = [tol] * len(ours)
    if eager_bound:
        bounds = [max(tol, 1.5 * e) for e in _eager_grad_errors(h, w, b, t, opts, g, gl, refs)]
    for name, x, r, bound in zip(("d_hidden", "d_weight", "d_bias"), ours, refs, bounds):
        assert rel_err(x, r) < bound, (name, rel_err(x, r), bound)
    return loss, dh, dw, db


@pytest.mark.parametrize("dtype", dtype_params("fp32", "fp16", "bf16"))
@pytest.mark.parametrize("has_bias,opts", [OPTION_CASES["plain"], OPTION_CASES["bias-smooth-softcap-scale"]],
                         ids=["plain", "bias-smooth-softcap-scale"])
def test_matches_float64_with_splits_and_chunks(dtype, has_bias, opts, poison):
    gen = torch.Generator().manual_seed(1)
    N, D, V = 37, 40, 70  # nothing a multiple of the 16-wide blocks
    h, w, b, t = make_inputs(N, D, V, dtype, has_bias, gen)
    t[[3, 11]] = opts.ignore_index
    assert forward_splits(SMALL, N, V, "cpu")[0] == 3 and chunk_width(SMALL, N, V, 2) == 32  # 3 chunks
    run_and_check(h, w, b, t, opts, SMALL, gen)
    if dtype != torch.float32:
        run_and_check(h, w, b, t, opts, SMALL.with_(dhidden_remainder="float"), gen)


@pytest.mark.slow  # (interpreter: 32 vocabulary chunks; CI's slow step)
@pytest.mark.parametrize("dtype", dtype_params("bf16", "fp16"))
def test_dhidden_remainder_keeps_the_fp32_sum(dtype, poison):
    """32 vocab chunks summed into a 16-bit d_hidden match one chunk (a single rounding of the fp32 sum)
    as closely as the remainder allows; dropping the remainder ("none") is visibly worse."""
    gen = torch.Generator().manual_seed(9)
    N, D, V = 20, 24, 512
    h, w, _, t = make_inputs(N, D, V, dtype, False, gen, logit_std=1.0)
    opts = LossOptions()
    _, lse = triton_forward(h, w, None, t, opts, config=INTERPRETER_CONFIG)
    g = torch.rand(N, generator=gen)
    one = triton_backward(g, None, h, w, None, t, lse, opts, config=INTERPRETER_CONFIG.with_(chunk_cols=V))[0]
    err = {}
    for mode in ("int8", "float", "none"):
        cfg = INTERPRETER_CONFIG.with_(chunk_cols=16, dhidden_remainder=mode)
        err[mode] = rel_err(triton_backward(g, None, h, w, None, t, lse, opts, config=cfg)[0], one.double())
    # The interpreter truncates fp32->bf16 (the GPU rounds to nearest), hence the looser bf16 bound.
    bound = 1e-3 if dtype == torch.bfloat16 else 1e-4
    assert err["int8"] < bound and err["float"] < bound, err
    assert err["none"] > 5 * max(err["int8"], err["float"]), err


def test_default_config_single_chunk(poison):
    gen = torch.Generator().manual_seed(2)
    h, w, b, t = make_inputs(20, 24, 50, torch.bfloat16, True, gen)
    run_and_check(h, w, b, t, LossOptions(label_smoothing=0.2), None, gen, with_glse=False)


def test_tiny_shapes(poison):
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        h, w, b, t = make_inputs(1, 3, 2, dtype, True, gen)
        run_and_check(h, w, b, t, LossOptions(softcap=5.0), SMALL, gen)


def test_ignored_rows_and_grad_lse():
    gen = torch.Generator().manual_seed(4)
    N = 30
    h, w, b, t = make_inputs(N, 20, 45, torch.float32, False, gen)
    t[::3] = -100
    opts = LossOptions()
    loss, dh, _, _ = run_and_check(h, w, b, t, opts, SMALL, gen, with_glse=False)
    assert (loss[::3] == 0).all()
    # Ignored rows with no grad_lse get exactly zero d_hidden.
    assert (dh[::3] == 0).all()
    # With grad_lse the ignored rows do receive the softmax gradient.
    run_and_check(h, w, b, t, opts, SMALL, gen, with_glse=True)


def test_custom_ignore_index_inside_vocab_and_int32_targets():
    gen = torch.Generator().manual_seed(5)
    h, w, b, t = make_inputs(25, 18, 40, torch.float32, True, gen)
    t[:5] = 7
    opts = LossOptions(ignore_index=7, label_smoothing=0.05)
    loss, _, _, _ = run_and_check(h, w, b, t.to(torch.int32), opts, SMALL, gen)
    assert (loss[:5] == 0).all()


def test_non_contiguous_inputs(poison):
    gen = torch.Generator().manual_seed(6)
    N, D, V = 21, 19, 50
    dtype = torch.bfloat16
    big = torch.randn(N + 3, 2 * D + 5, generator=gen).to(dtype)
    h = big[2:2 + N, 5:5 + 2 * D:2]  # row stride 2D+5, column stride 2
    w = (torch.randn(D, V, generator=gen) * 0.4).to(dtype).t()  # transposed storage: strides (1, V)
    assert not h.is_contiguous() and not w.is_contiguous()
    t = torch.randint(0, V, (N,), generator=gen)
    g = torch.rand(N, generator=gen)
    opts = LossOptions(softcap=4.0)
    loss, lse = triton_forward(h, w, None, t, opts, config=SMALL)
    loss_c, lse_c = triton_forward(h.contiguous(), w.contiguous(), None, t, opts, config=SMALL)
    assert torch.equal(loss, loss_c) and torch.equal(lse, lse_c)
    dh, dw, _ = triton_backward(g, None, h, w, None, t, lse, opts, config=SMALL)
    dh_c, dw_c, _ = triton_backward(g, None, h.contiguous(), w.contiguous(), None, t, lse, opts, config=SMALL)
    assert torch.equal(dh, dh_c) and torch.equal(dw, dw_c)
    run_and_check(h, w, None, t, opts, SMALL, gen)


def test_out_of_range_target_gives_nan_for_that_row_only():
    gen = torch.Generator().manual_seed(7)
    N, V = 12, 33
    h, w, b, t = make_inputs(N, 16, V, torch.float32, False, gen)
    t[4] = V  # one past the end
    t[9] = -3  # negative, not ignore_index
    loss, dh, _, _ = run_and_check(h, w, b, t, LossOptions(), SMALL, gen, expect_nan_rows=(4, 9))
    assert torch.isnan(dh[4]).all() and torch.isnan(dh[9]).all()
    assert not torch.isnan(dh[[0, 1, 2, 3, 5, 6, 7, 8, 10, 11]]).any()


def test_large_target_does_not_wrap_into_range():
    gen = torch.Generator().manual_seed(8)
    h, w, b, t = make_inputs(4, 16, 20, torch.float32, False, gen)
    t[1] = (1 << 32) + 3  # would alias to 3 if truncated to int32
    loss, _ = triton_forward(h, w, b, t, LossOptions(), config=SMALL)
    assert torch.isnan(loss[1]) and not torch.isnan(loss[[0, 2, 3]]).any()


@settings(max_examples=fuzz_examples(0.15))
@given(
    N=st.integers(1, 40), D=st.integers(1, 36), V=st.integers(2, 70),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    has_bias=st.booleans(), softcap=st.sampled_from([None, 2.0]),
    eps=st.sampled_from([0.0, 0.3]), scale=st.sampled_from([1.0, 1.7]),
    chunk=st.sampled_from([16, 48]), splits=st.sampled_from([1, 2, 5]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_options(N, D, V, dtype, has_bias, softcap, eps, scale, chunk, splits, seed):
    gen = torch.Generator().manual_seed(seed)
    # Milder logits than the fixed cases: with N=1 and a peaked softmax, p_t - 1 cancels and fp32's own
    # rounding of lse (not the kernel) dominates the relative error of the tiny gradient.
    h, w, b, t = make_inputs(N, D, V, dtype, has_bias, gen, logit_std=0.5)
    if N > 2:
        t[N // 2] = -100
    opts = LossOptions(label_smoothing=eps, softcap=softcap, logit_scale=scale)
    cfg = INTERPRETER_CONFIG.with_(splits=splits, chunk_cols=chunk)
    run_and_check(h, w, b, t, opts, cfg, gen, with_glse=bool(seed % 2), eager_bound=True)


def test_config_is_a_frozen_object():
    cfg = SMALL.with_(chunk_cols=64)
    assert isinstance(cfg, KernelConfig) and cfg.chunk_cols == 64 and SMALL.chunk_cols == 32
    with pytest.raises(Exception):
        cfg.chunk_cols = 3  # type: ignore[misc]


def test_inputs_that_require_grad():
    gen = torch.Generator().manual_seed(10)
    h, w, b, t = make_inputs(5, 16, 40, torch.float32, True, gen)
    h, w, b = (x.requires_grad_() for x in (h, w, b))
    loss, lse = triton_forward(h, w, b, t, LossOptions(), config=SMALL)
    dh, dw, db = triton_backward(torch.ones(5), None, h, w, b, t, lse, LossOptions(), config=SMALL)
    assert dw.shape == w.shape and not dw.requires_grad


@pytest.mark.parametrize("dtype", dtype_params("bf16", "fp16"))
def test_dhidden_cublas_fold_variant(dtype, poison):
    """The "cublas_fold" d_hidden scheme (config.low_memory_dhidden: float32 products folded into hi +
    remainder, several slabs of rows) gives d_hidden as exactly as the Triton accumulate kernel, with every
    option."""
    gen = torch.Generator().manual_seed(10)
    h, w, b, t = make_inputs(21, 24, 90, dtype, True, gen)
    opts = LossOptions(label_smoothing=0.1, softcap=4.0, logit_scale=0.8)
    cfg = INTERPRETER_CONFIG.with_(chunk_cols=32, dhidden_scheme="cublas_fold", fold_slab_bytes=8 * 24 * 4)
    run_and_check(h, w, b, t, opts, cfg, gen)  # 3 slabs of 8 rows


@triton.jit
def _store_rounded_bf16(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, to_rne(x, tl.bfloat16), mask=offs < n)


def test_bf16_rounding_keeps_every_nan():
    """``to_rne`` (the kernels' fp32 -> bf16 store) on the NaN bit patterns a GPU produces (0x7FFFFFFF,
    0xFFFFFFFF) and the canonical one: NaN stays NaN (a rounding bias carried into the sign gave +-0);
    finite values and infinities round to nearest even as torch does."""
    bits = torch.tensor([0x7FC00000, 0x7FFFFFFF, -1, 0x7F800000, -0x800000,  # NaNs, +-inf
                         0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF], dtype=torch.int32)  # ties, near-tie
    x = bits.view(torch.float32)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    _store_rounded_bf16[(1,)](x, out, x.numel(), BLOCK=16)
    want = x.to(torch.bfloat16)
    assert torch.isnan(out[:3]).all(), out
    torch.testing.assert_close(out[3:], want[3:], rtol=0, atol=0)
