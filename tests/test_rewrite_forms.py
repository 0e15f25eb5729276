"""One test per matched form (rewrite count + loss + every gradient vs eager, float64) and per negative."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import _reset_dynamo, assert_left_alone, check, compile_counting, make_inputs, n_rewrites  # noqa: F401

V, D = 11, 6


@pytest.fixture
def data():
    return make_inputs(d=D, v=V)


# ---- matmul spellings ------------------------------------------------------------------------

def test_linear_no_bias(data):
    h, w, b, y = data
    check(lambda h, w, y: F.cross_entropy(F.linear(h, w).view(-1, V), y.view(-1)), (h, w, y), 1)


def test_linear_bias(data):
    h, w, b, y = data
    check(lambda h, w, b, y: F.cross_entropy(F.linear(h, w, b).flatten(0, 1), y.flatten()), (h, w, b, y), 1)


def test_nn_linear_and_nn_crossentropyloss():
    torch.manual_seed(0)
    head = nn.Linear(D, V).double()
    crit = nn.CrossEntropyLoss(ignore_index=3)
    h, _, _, y = make_inputs(d=D, v=V, ignore_index=3)

    def f(h, y):
        return crit(head(h).view(-1, V), y.view(-1))
    check(f, (h, y), 1, params=list(head.parameters()))


@pytest.mark.parametrize("spelling", ["at_T", "matmul_t", "method_matmul", "transpose", "mT", "permute"])
def test_matmul_spellings(data, spelling):
    h, w, b, y = data
    mm = {
        "at_T": lambda h, w: h @ w.T,
        "matmul_t": lambda h, w: torch.matmul(h, w.t()),
        "method_matmul": lambda h, w: h.matmul(w.transpose(0, 1)),
        "transpose": lambda h, w: h @ torch.transpose(w, 1, 0),
        "mT": lambda h, w: h @ w.mT,
        "permute": lambda h, w: h @ w.permute(1, 0),
    }[spelling]
    check(lambda h, w, y: F.cross_entropy(mm(h, w).reshape(-1, V), y.reshape(-1)), (h, w, y), 1)


def test_weight_stored_dv(data):
    """``h @ B`` with B [D, V] (not a transpose in the graph): the op gets ``B.t()``."""
    h, w, b, y = data
    B = w.detach().t().contiguous().requires_grad_()
    check(lambda h, B, y: F.cross_entropy((h @ B).view(-1, V), y.view(-1)), (h, B, y), 1)


def test_mm_2d(data):
    h, w, b, y = data
    check(lambda h, w, y: F.cross_entropy(torch.mm(h.reshape(-1, D), w.t()), y.reshape(-1)), (h, w, y), 1)


@pytest.mark.parametrize("eq", ["btd,vd->btv", "...d,vd->...v", "btd,dv->btv"])
def test_einsum(data, eq):
    h, w, b, y = data
    W = w if eq.split(",")[1].startswith("v") else w.detach().t().contiguous().requires_grad_()
    check(lambda h, W, y: F.cross_entropy(torch.einsum(eq, h, W).view(-1, V), y.view(-1)), (h, W, y), 1)


def test_addmm(data):
    h, w, b, y = data
    check(lambda h, w, b, y: F.cross_entropy(torch.addmm(b, h.view(-1, D), w.T), y.view(-1)), (h, w, b, y), 1)


@pytest.mark.parametrize("order", ["z_plus_b", "b_plus_z"])
def test_matmul_plus_bias(data, order):
    h, w, b, y = data
    add = (lambda z, b: z + b) if order == "z_plus_b" else (lambda z, b: b + z)
    check(lambda h, w, b, y: F.cross_entropy(add(h @ w.T, b).view(-1, V), y.view(-1)), (h, w, b, y), 1)


def test_tied_embedding():
    torch.manual_seed(0)
    emb = nn.Embedding(V, D).double()
    ids = torch.randint(0, V, (2, 7))

    def f(ids):
        h = torch.tanh(emb(ids))
        logits = F.linear(h, emb.weight)
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    check(f, (ids,), 1, params=[emb.weight])


# ---- between matmul and loss -------------------------------------------------------------------

@pytest.mark.parametrize("op", ["mul", "rmul", "div", "mul_method", "div_method"])
def test_scalar_scale(data, op):
    h, w, b, y = data
    sc = {"mul": lambda z: z * 0.7, "rmul": lambda z: 2 * z, "div": lambda z: z / 3.0,
          "mul_method": lambda z: z.mul(1.5), "div_method": lambda z: z.div(4)}[op]
    check(lambda h, w, y: F.cross_entropy(sc(h @ w.T).view(-1, V), y.view(-1)), (h, w, y), 1)


@pytest.mark.parametrize("spelling", ["gemma", "method", "scaled_first", "reciprocal"])
def test_softcap(data, spelling):
    h, w, b, y = data
    s = 2.5

    def cap(z):
        if spelling == "gemma":
            z = z / s
            z = torch.tanh(z)
            return z * s
        if spelling == "method":
            return s * (z / s).tanh()
        if spelling == "scaled_first":
            return s * torch.tanh((z * 0.5) / s)
        return torch.tanh(z * (1 / s)) * s
    results = check(lambda h, w, b, y: F.cross_entropy(cap(F.linear(h, w, b)).float().view(-1, V), y.view(-1)),
                    (h, w, b, y), 1, return_results=True)
    assert results[0].rewrites[0].options["softcap"] == s


@pytest.mark.parametrize("cast", ["float", "to_dtype", "to_kw", "double_then_float", "to_device"])
def test_casts(cast):
    h, w, b, y = make_inputs(d=D, v=V, dtype=torch.float32)
    c = {"float": lambda z: z.float(), "to_dtype": lambda z: z.to(torch.float32), "to_device": lambda z: z.to("cpu"),
         "to_kw": lambda z: z.to(dtype=torch.float64), "double_then_float": lambda z: z.double().float()}[cast]
    check(lambda h, w, y: F.cross_entropy(c(h @ w.T).view(-1, V), y.view(-1)), (h, w, y), 1, rtol=1e-5, atol=1e-6)


def test_bf16_upcast():
    h, w, b, y = make_inputs(d=D, v=V, dtype=torch.bfloat16)
    check(lambda h, w, y: F.cross_entropy((h @ w.T).float().view(-1, V), y.view(-1)), (h, w, y), 1,
          rtol=2e-2, atol=2e-2)


def test_autocast_region():
    h, w, b, y = make_inputs(d=D, v=V, dtype=torch.float32)

    def f(h, w, b, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = F.linear(h, w, b)
        return F.cross_entropy(z.float().view(-1, V), y.view(-1))
    check(f, (h, w, b, y), 1, rtol=2e-2, atol=2e-2)


def test_autocast_whole():
    h, w, b, y = make_inputs(d=D, v=V, dtype=torch.float32)

    def f(h, w, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy((h @ w.T).view(-1, V), y.view(-1))
    check(f, (h, w, y), 1, rtol=2e-2, atol=2e-2)


def test_inference_no_grad(data):
    h, w, b, y = data
    with torch.no_grad():
        check(lambda h, w, b, y: F.cross_entropy(F.linear(h, w, b).view(-1, V), y.view(-1)), (h, w, b, y), 1)


def test_matmul_output_used_twice_in_chain(data):
    """Two losses over the same ``.float()`` logits plus an unrelated use: the logits are needed anyway (each
    op would compute them again), so both losses are left to Inductor, each naming what else reads them."""
    h, w, b, y = data

    def f(h, w, y):
        z = (h @ w.T).float()
        a = F.cross_entropy(z.view(-1, V), y.view(-1))
        c = F.cross_entropy(z.transpose(1, 2), y, reduction="sum")
        return a + c, z.argmax(-1)
    misses = assert_left_alone(f, (h, w, y), "left to Inductor: the logits are also needed by another cross-entropy")
    assert len(misses) == 2 and all("`argmax`" in m.reason and m.category == "logits_kept" for m in misses), misses


# ---- loss spellings -------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["F", "torch_fn", "method"])
def test_log_softmax_nll(data, spelling):
    h, w, b, y = data
    ls = {"F": lambda z: F.log_softmax(z, dim=-1), "torch_fn": lambda z: torch.log_softmax(z, -1),
          "method": lambda z: z.log_softmax(-1)}[spelling]
    check(lambda h, w, y: F.nll_loss(ls((h @ w.T).float()).view(-1, V), y.view(-1)), (h, w, y), 1)


def test_nll_of_flattened_log_softmax_3d(data):
    h, w, b, y = data
    check(lambda h, w, y: F.nll_loss(F.log_softmax(h @ w.T, 2).flatten(0, 1), y.flatten()), (h, w, y), 1)


@pytest.mark.parametrize("spelling", ["transpose", "permute", "movedim"])
def test_class_dim_layout(data, spelling):
    h, w, b, y = data
    tr = {"transpose": lambda z: z.transpose(1, 2), "permute": lambda z: z.permute(0, 2, 1),
          "movedim": lambda z: z.movedim(-1, 1)}[spelling]
    check(lambda h, w, y: F.cross_entropy(tr(h @ w.T), y), (h, w, y), 1)


def test_class_dim_nll(data):
    h, w, b, y = data
    check(lambda h, w, y: F.nll_loss(F.log_softmax((h @ w.T).transpose(1, 2), dim=1), y, reduction="none"),
          (h, w, y), 1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 0, 4])
def test_reduction_ignore_index(reduction, ignore_index):
    h, w, b, y = make_inputs(d=D, v=V, ignore_index=ignore_index)
    check(lambda h, w, y: F.cross_entropy((h @ w.T).view(-1, V), y.view(-1), ignore_index=ignore_index,
                                          reduction=reduction), (h, w, y), 1)


def test_none_with_downstream_math(data):
    h, w, b, y = data
    mask = (torch.arange(10) % 3 != 0).double()

    def f(h, w, y):
        per_tok = F.cross_entropy((h @ w.T).view(-1, V), y.view(-1), reduction="none")
        return (per_tok * mask).sum() / mask.sum() + per_tok.max()
    check(f, (h, w, y), 1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing(data, reduction):
    h, w, b, y = data
    check(lambda h, w, y: F.cross_entropy((h @ w.T).view(-1, V), y.view(-1), label_smoothing=0.15,
                                          reduction=reduction), (h, w, y), 1)


@pytest.mark.parametrize("count", ["int", "tensor"])
def test_sum_over_token_count(data, count):
    h, w, b, y = data
    n = 7 if count == "int" else torch.tensor(7.0, dtype=torch.float64)
    check(lambda h, w, y, n: F.cross_entropy((h @ w.T).view(-1, V), y.view(-1), reduction="sum") / n,
          (h, w, y, n), 1)


# ---- label shifting ------------------------------------------------------------------------

def test_shift_labels_by_pad(data):
    """HF's ForCausalLMLoss: labels = pad(labels, (0, 1), value=-100)[..., 1:]."""
    h, w, b, y = data

    def f(h, w, y):
        logits = F.linear(h, w).float()
        labels = F.pad(y, (0, 1), value=-100)[..., 1:].contiguous()
        return F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)
    check(f, (h, w, y), 1)


@pytest.mark.parametrize("spelling", ["slice", "ellipsis", "contiguous_view"])
def test_shift_by_slicing_logits(data, spelling):
    h, w, b, y = data

    def f(h, w, y):
        logits = h @ w.T
        if spelling == "slice":
            z = logits[:, :-1].reshape(-1, V)
        elif spelling == "ellipsis":
            z = logits[..., :-1, :].reshape(-1, V)
        else:
            z = logits[:, :-1, :].contiguous().view(-1, V)
        return F.cross_entropy(z, y[:, 1:].reshape(-1))
    check(f, (h, w, y), 1)


def test_hf_noop_slice_and_noncontiguous_hidden(data):
    """``h[:, slice(0, None), :]`` then a linear; hidden is a transposed (non-contiguous) view."""
    h, w, b, y = data
    hs = h.detach().transpose(0, 1).contiguous().requires_grad_()  # [T, B, D]

    def f(hs, w, y):
        h = hs.transpose(0, 1)[:, 0:, :]
        return F.cross_entropy(F.linear(h, w).view(-1, V), y.view(-1))
    check(f, (hs, w, y), 1)


# ---- z-loss --------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["same_cast", "separate_cast", "keepdim", "flat"])
def test_z_loss_served(data, where):
    h, w, b, y = data

    def f(h, w, b, y):
        z = 3.0 * torch.tanh(F.linear(h, w, b) / 3.0)
        zf = z.float()
        ce = F.cross_entropy(zf.view(-1, V), y.view(-1))
        if where == "same_cast":
            lse = torch.logsumexp(zf, dim=-1)
        elif where == "separate_cast":
            lse = z.float().logsumexp(-1)
        elif where == "keepdim":
            lse = torch.logsumexp(zf, -1, keepdim=True)
        else:
            lse = torch.logsumexp(zf.view(-1, V), -1)
        return ce + 1e-2 * (lse ** 2).mean()
    results = check(f, (h, w, b, y), 1, return_results=True)
    r = results[0].rewrites[0]
    assert r.lse_served == 1 and not r.logits_kept


def test_z_loss_of_unsliced_logits_is_left_to_inductor(data):
    """A z-loss over other rows than the loss's (the unshifted logits) is not served by the op's lse: the
    logits are needed for it, so the loss is left to Inductor and the report names the logsumexp."""
    h, w, b, y = data

    def f(h, w, y):
        z = h @ w.T
        ce = F.cross_entropy(z[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1))
        return ce + 1e-2 * torch.logsumexp(z, -1).pow(2).mean()
    misses = assert_left_alone(f, (h, w, y), "left to Inductor: the logits are also needed by `logsumexp`")
    assert misses[0].category == "logits_kept"


# ---- logits with other users: left to Inductor (the op would compute them a second time) -------------------

def test_logits_returned(data):
    h, w, b, y = data

    def f(h, w, y):
        logits = h @ w.T
        return F.cross_entropy(logits.float().view(-1, V), y.view(-1)), logits
    misses = assert_left_alone(f, (h, w, y), "left to Inductor: the logits are also needed by a graph output")
    assert "returns only the loss" in misses[0].reason and "integrations.transformers" in misses[0].reason


def test_logits_returned_values_and_gradients_equal_eager(data):
    """Left alone means the graph is untouched: loss, logits and every gradient (through both) are eager's."""
    h, w, b, y = data

    def f(h, w, b, y):
        logits = F.linear(h, w, b)
        return F.cross_entropy(logits.float().view(-1, V), y.view(-1)), logits
    check(f, (h, w, b, y), 0)


def test_detached_metric_keeps_the_logits(data):
    """A ``.detach()`` accuracy metric is not free: it reads the logits' values, so the loss is left alone."""
    h, w, b, y = data

    def f(h, w, y):
        z = h @ w.T
        acc = (z.detach().argmax(-1) == y).float().mean()
        return F.cross_entropy(z.view(-1, V), y.view(-1)), acc
    assert_left_alone(f, (h, w, y), "left to Inductor: the logits are also needed by `detach`")


def test_served_z_loss_is_not_another_user(data):
    """A logsumexp of the loss's own rows is the op's lse output: the logits are dead after the rewrite."""
    h, w, b, y = data

    def f(h, w, y):
        z = (h @ w.T).float()
        return F.cross_entropy(z.view(-1, V), y.view(-1)) + 1e-2 * z.logsumexp(-1).square().mean()
    r = check(f, (h, w, y), 1, return_results=True)[0].rewrites[0]
    assert r.lse_served == 1 and not r.logits_kept


def test_two_losses_one_matmul(data):
    """Two cross-entropies of one matmul: one op each would compute the logits twice; left to Inductor."""
    h, w, b, y = data
    y2 = torch.flip(y, [0])

    def f(h, w, y, y2):
        z = (h @ w.T).view(-1, V)
        return F.cross_entropy(z, y.view(-1)) + 0.5 * F.cross_entropy(z, y2.reshape(-1), reduction="sum")
    misses = assert_left_alone(f, (h, w, y, y2), "needed by another cross-entropy")
    assert len(misses) == 2


# ---- negatives: left exactly as they were --------------------------------------------------------

def _miss(fn, args, reason_part):
    assert_left_alone(fn, args, reason_part, clone_args=False)


def test_negative_soft_targets(data):
    h, w, b, y = data
    p = torch.softmax(torch.randn(10, V, dtype=torch.float64), -1)
    _miss(lambda h, w, p: F.cross_entropy((h @ w.T).view(-1, V), p), (h, w, p), "soft")


def test_negative_class_weight(data):
    h, w, b, y = data
    cw = torch.rand(V, dtype=torch.float64)
    _miss(lambda h, w, y: F.cross_entropy((h @ w.T).view(-1, V), y.view(-1), weight=cw), (h, w, y), "weight")


@pytest.mark.parametrize("op,reason", [("tensor_scale", "unsupported op between the matmul and the loss: call_function mul"),
                                       ("relu", "unsupported op between the matmul and the loss: call_function relu"),
                                       ("square", "unsupported op between the matmul and the loss: call_function mul"),
                                       ("scale_after_softcap", "scaling after the softcap"),
                                       ("bias_after_scale", "a bias added after scaling")])
def test_negative_math_between(data, op, reason):
    h, w, b, y = data
    s = torch.tensor(2.0, dtype=torch.float64)
    ep = {"tensor_scale": lambda z: z * s, "relu": torch.relu, "square": lambda z: z * z,
          "scale_after_softcap": lambda z: 2.0 * (3.0 * torch.tanh(z / 3.0)),
          "bias_after_scale": lambda z: z * 2.0 + b}[op]
    _miss(lambda h, w, y: F.cross_entropy(ep(h @ w.T).view(-1, V), y.view(-1)), (h, w, y), reason)


def test_negative_class_dim_not_vocab(data):
    h, w, b, y = data
    # (B, T, V) given as (N, C, d): class dim is T, not V
    yy = torch.randint(0, 5, (2, V))
    _miss(lambda h, w, y: F.cross_entropy(h @ w.T, y), (h, w, yy), "class dim")


def test_negative_vocab_slice(data):
    """``z[..., :V-1]`` touches the class dim: not a row op."""
    h, w, b, y = data
    yy = y.clamp(0, V - 2)
    _miss(lambda h, w, y: F.cross_entropy((h @ w.T)[..., :-1].reshape(-1, V - 1), y.view(-1)), (h, w, yy),
          "unsupported op between the matmul and the loss: call_function getitem")


def test_logits_from_outside_the_graph_are_reported_as_such():
    """No matmul in the graph (logits passed in, e.g. after a graph break): nothing rewritten, and the
    one report says where the logits came from."""
    z = torch.randn(10, V, dtype=torch.float64)
    y = torch.randint(0, V, (10,))
    compiled, results = compile_counting(lambda z, y: F.cross_entropy(z, y))
    compiled(z, y)
    misses = [m for r in results for m in r.misses]
    assert n_rewrites(results) == 0 and len(misses) == 1 and "input of this graph" in misses[0].reason


# ---- inside subgraphs of higher-order ops ---------------------------------------------------

def _checkpointed(fn):
    from torch.utils.checkpoint import checkpoint

    return lambda *args: checkpoint(fn, *args, use_reentrant=False)


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_loss_inside_activation_checkpoint(inner):
    """``checkpoint(lm_head_and_loss, ...)``: Dynamo puts the region in a subgraph; it is rewritten there
    (the weight's ``.T`` is hoisted out of the body, so the body sees ``h @ B`` with ``B`` [D, V])."""
    h, w, b, y = make_inputs(d=D, v=V, dtype=torch.float32)
    check(_checkpointed(lambda h, w, y: F.cross_entropy((h @ w.T).float().view(-1, V), y.view(-1))),
          (h, w, y), 1, params=(h, w), inner=inner, rtol=1e-5, atol=1e-6)


def test_checkpoint_body_and_main_graph_both_rewritten(data):
    h, w, b, y = data

    def f(h, w, y):
        inside = _checkpointed(lambda h, w, y: F.cross_entropy(F.linear(h, w).view(-1, V), y.view(-1)))(h, w, y)
        outside = F.cross_entropy(F.linear(2.0 * h, w).view(-1, V), y.view(-1), reduction="sum")
        return inside + outside
    check(f, (h, w, y), 2, params=(h, w))


def test_loss_inside_torch_cond_is_reported_not_rewritten(data):
    h, w, b, y = data

    def f(h, w, y):
        def loss(h, w, y):
            return F.cross_entropy((h @ w.T).view(-1, V), y.view(-1))
        return torch.cond(h.sum() > 0, loss, lambda h, w, y: 2.0 * loss(h, w, y), (h, w, y))
    h, w = h.detach(), w.detach()
    compiled, results = compile_counting(f, inner="eager")  # aot_eager itself rejects this cond (aliasing)
    torch.testing.assert_close(compiled(h, w, y), f(h, w, y), rtol=1e-12, atol=1e-12)
    misses = [m for r in results for m in r.misses]
    assert n_rewrites(results) == 0 and len(misses) == 2, misses
    assert all("higher_order.cond" in m.reason for m in misses)


# ---- through full Inductor ------------------------------------------------------------------

def test_inductor_inner_softcap_shift():
    h, w, b, y = make_inputs(d=D, v=V, dtype=torch.float32)

    def f(h, w, b, y):
        z = 2.0 * torch.tanh(F.linear(h, w, b) / 2.0)
        return F.cross_entropy(z[:, :-1].float().reshape(-1, V), y[:, 1:].reshape(-1), label_smoothing=0.1)
    check(f, (h, w, b, y), 1, inner="inductor", rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["shift_slice", "class_dim", "z_loss"])
def test_dynamic_shapes(form):
    """dynamic=True: B, T, D, V all symbolic; the rewrite must still fire and be exact."""
    h, w, b, y = make_inputs((3, 7), d=D, v=V)

    def f(h, w, y):
        z = h @ w.T
        if form == "shift_slice":
            return F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), y[:, 1:].reshape(-1))
        if form == "class_dim":
            return F.cross_entropy(z.transpose(1, 2), y, reduction="none")
        zf = z.float()
        return F.cross_entropy(zf.view(-1, zf.size(-1)), y.view(-1)) + torch.logsumexp(zf, -1).square().mean()
    check(f, (h, w, y), 1, dynamic=True)


def test_negative_grad_mode_differs(data):
    """Logits computed under no_grad, loss with grad: eager's loss has no path to h/W; keep it so."""
    h, w, b, y = data

    def f(h, w, y):
        with torch.no_grad():
            z = h @ w.T
        return F.cross_entropy(z.view(-1, V), y.view(-1)) + (h * 0).sum()
    _miss(f, (h, w, y), "grad mode")


def test_no_grad_block_around_both(data):
    h, w, b, y = data

    def f(h, w, y):
        with torch.no_grad():
            loss = F.cross_entropy((h @ w.T).view(-1, V), y.view(-1))
        return loss + h.sum()
    check(f, (h, w, y), 1)


def test_class_dim_4d_permute():
    """(N, d1, d2, V) logits given to F.cross_entropy as (N, V, d1, d2) via permute(0, 3, 1, 2)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 3, 4, D, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(V, D, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, V, (2, 3, 4), generator=g)
    check(lambda h, w, y: F.cross_entropy((h @ w.T).permute(0, 3, 1, 2), y, reduction="none"), (h, w, y), 1)
