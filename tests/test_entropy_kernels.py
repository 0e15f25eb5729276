"""The entropy in the Triton kernels, under the Triton interpreter on CPU tensors, against float64: the fused
forward (one more running sum per row, merged across vocabulary splits), the backward's draw kernel (the
entropy's term of d(logits), over several vocabulary chunks) and the chunked no-grad forward's row kernel.
Every output element is checked (``poison``: unwritten outputs are NaN)."""
import pytest
import torch

from cce_inductor.kernels import triton_backward, triton_chunked_forward, triton_forward
from cce_inductor.kernels.config import INTERPRETER_CONFIG, chunk_width, forward_splits
from cce_inductor.options import LossOptions
from cce_inductor.reference import reference_with_entropy, rel_err

from helpers import OPTION_CASES, dtype_params, needs_interpreter, poison  # noqa: F401  (poison: a fixture)
from helpers import kernel_inputs as make_inputs

pytestmark = needs_interpreter

SMALL = INTERPRETER_CONFIG.with_(splits=3, chunk_cols=32)  # 3 vocabulary splits forward, 3 chunks backward
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
FWD_TOL = 2e-5  # fp32 accumulation of exactly representable inputs: fp32 accuracy for every dtype
CASES = {"plain": OPTION_CASES["plain"], "bias-smooth-softcap-scale": OPTION_CASES["bias-smooth-softcap-scale"]}


def check_forward_and_backward(h, w, b, t, opts, cfg, gen, grad_loss=True, grad_lse=True):
    N = h.shape[0]
    loss, lse, entropy = triton_forward(h, w, b, t, opts, config=cfg, with_entropy=True)
    g = torch.rand(N, generator=gen) + 0.5 if grad_loss else torch.zeros(N)
    gl = torch.randn(N, generator=gen) if grad_lse else None
    ge = torch.randn(N, generator=gen)
    rl, rlse, rent, rdh, rdw, rdb = reference_with_entropy(h, w, b, t, opts, g, gl, ge)
    assert entropy.shape == (N,) and entropy.dtype == torch.float32 and not entropy.isnan().any()
    assert rel_err(entropy, rent) < FWD_TOL and rel_err(lse, rlse) < FWD_TOL
    scale = rl.norm() + rlse.norm()  # loss = lse - z_t may cancel: its error against lse's size
    assert ((loss.double() - rl).norm() / scale).item() < FWD_TOL
    dh, dw, db = triton_backward(g, gl, h, w, b, t, lse, opts, config=cfg, grad_entropy=ge, entropy=entropy)
    tol = GRAD_TOL[h.dtype]
    assert dh.dtype == h.dtype and dw.dtype == w.dtype
    assert rel_err(dh, rdh) < tol, rel_err(dh, rdh)
    assert rel_err(dw, rdw) < tol, rel_err(dw, rdw)
    if b is not None:
        assert rel_err(db, rdb) < tol, rel_err(db, rdb)
    return entropy


@pytest.mark.parametrize("dtype", dtype_params("fp32", "fp16", "bf16"))
@pytest.mark.parametrize("case", list(CASES))
def test_fused_forward_and_backward_with_entropy(dtype, case, poison):
    _fused_case(dtype, *CASES[case], seed=5 + list(CASES).index(case))


def test_fused_forward_and_backward_with_entropy_ignore_index_and_scale(poison):
    _fused_case(torch.float32, *OPTION_CASES["ii5-scale"], seed=4)


def _fused_case(dtype, has_bias, opts, seed):
    gen = torch.Generator().manual_seed(seed)
    N, D, V = 37, 40, 70  # nothing a multiple of the 16-wide blocks
    h, w, b, t = make_inputs(N, D, V, dtype, has_bias, gen)
    t[[3, 11]] = opts.ignore_index  # the entropy of an ignored row is still read (it has no target)
    assert forward_splits(SMALL, N, V, "cpu")[0] == 3 and chunk_width(SMALL, N, V, 2) == 32
    check_forward_and_backward(h, w, b, t, opts, SMALL, gen)


def test_entropy_alone_through_the_kernels(poison):
    """Only the entropy has an upstream gradient (an entropy bonus with the loss discarded)."""
    gen = torch.Generator().manual_seed(7)
    h, w, b, t = make_inputs(21, 24, 50, torch.float32, True, gen)
    check_forward_and_backward(h, w, b, t, LossOptions(softcap=2.0), SMALL, gen, grad_loss=False, grad_lse=False)


def test_one_split_equals_many(poison):
    """The split merge of the entropy's sum (each split relative to its own max) changes nothing."""
    gen = torch.Generator().manual_seed(8)
    h, w, b, t = make_inputs(19, 16, 90, torch.float32, False, gen, logit_std=6.0)
    one = triton_forward(h, w, b, t, LossOptions(), config=INTERPRETER_CONFIG.with_(splits=1), with_entropy=True)
    many = triton_forward(h, w, b, t, LossOptions(), config=INTERPRETER_CONFIG.with_(splits=5), with_entropy=True)
    torch.testing.assert_close(one[2], many[2], rtol=1e-6, atol=1e-6)


def test_without_entropy_the_forward_returns_two_outputs(poison):
    gen = torch.Generator().manual_seed(9)
    h, w, b, t = make_inputs(9, 16, 20, torch.float32, False, gen)
    assert len(triton_forward(h, w, b, t, LossOptions(), config=SMALL)) == 2
    assert len(triton_chunked_forward(h, w, b, t, LossOptions(), tokens_per_chunk=4, config=SMALL)) == 2
    with pytest.raises(ValueError, match="needs the forward's entropy"):
        triton_backward(torch.ones(9), None, h, w, b, t, torch.zeros(9), LossOptions(), config=SMALL,
                        grad_entropy=torch.ones(9))


# The chunked no-grad forward's logits are a 16-bit matmul output (as eager's are): 16-bit tolerances.
CHUNKED_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype,case,V", [
    (torch.float32, "plain", 53), (torch.float32, "bias-smooth-softcap-scale", 53), (torch.float32, "ii5-scale", 53),
    (torch.bfloat16, "bias-smooth-softcap-scale", 53),
    (torch.float32, "bias-smooth-softcap-scale", 11),  # 11 < the row block: lanes that never see a column
    pytest.param(torch.bfloat16, "plain", 11, marks=pytest.mark.slow),
])
def test_chunked_no_grad_forward_with_entropy(dtype, case, V, poison):
    has_bias, opts = OPTION_CASES[case]
    gen = torch.Generator().manual_seed(31 + list(OPTION_CASES).index(case))
    N, D = 29, 24
    h, w, b, t = make_inputs(N, D, V, dtype, has_bias, gen)
    t[[2, 7]] = opts.ignore_index
    t[9] = V + 2  # out of range: NaN loss for that row only; its entropy is still read
    loss, lse, entropy = triton_chunked_forward(h, w, b, t, opts, tokens_per_chunk=6, config=INTERPRETER_CONFIG,
                                                with_entropy=True)
    _, rlse, rent, *_ = reference_with_entropy(h, w, b, t, opts)
    assert torch.isnan(loss[9]) and not entropy.isnan().any() and not lse.isnan().any()
    tol = CHUNKED_TOL[dtype]
    assert rel_err(entropy, rent) < tol and rel_err(lse, rlse) < tol
    fused = triton_forward(h, w, b, t, opts, config=INTERPRETER_CONFIG, with_entropy=True)
    if dtype == torch.float32:  # the same logits: the same numbers to float32 rounding
        torch.testing.assert_close(entropy, fused[2], rtol=1e-5, atol=1e-6)
