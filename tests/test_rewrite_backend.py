"""The ways in: make_backend(inner=...), backend="cce", install()/uninstall(), explain()."""
from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

import cce_inductor.backend as B
from cce_inductor.rewrite.emit import op_target
from cce_inductor.explain import explain
from helpers import _reset_dynamo, check, make_inputs  # noqa: F401

V, D = 11, 6


def loss_fn(h, w, y):
    return F.cross_entropy((h @ w.T).float().view(-1, V), y.view(-1))


def _op_in_graph(gm):
    return any(n.target is op_target() for n in gm.graph.nodes)


@pytest.mark.parametrize("inner", ["aot_eager", "eager", "callable"])
def test_make_backend_inner_independent(inner):
    seen = []

    def my_backend(gm, example_inputs):
        seen.append(_op_in_graph(gm))
        return gm.forward
    h, w, b, y = make_inputs(d=D, v=V)
    check(loss_fn, (h, w, y), 1, inner=my_backend if inner == "callable" else inner)
    if inner == "callable":
        assert seen and all(seen)


def test_backend_name_registered():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("cce") is B.cce_backend


@pytest.mark.parametrize("how", ["name", "make_backend"])
@pytest.mark.parametrize("kw, expect", [
    (dict(mode="max-autotune-no-cudagraphs"), {"max_autotune": True}),
    (dict(options={"epilogue_fusion": False}), {"epilogue_fusion": False}),
    (dict(), {}),
])
def test_mode_and_options_reach_inductor(monkeypatch, how, kw, expect):
    """``torch.compile(..., backend="cce", mode=/options=)`` configures Inductor as ``backend="inductor"`` would."""
    import torch._inductor.compile_fx as cfx

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen.append((dict(config_patches or {}), _op_in_graph(gm)))
        return gm.forward  # run the rewritten graph as is: what reaches Inductor is the point here
    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    h, w, b, y = make_inputs(d=D, v=V)
    backend = "cce" if how == "name" else B.make_backend("inductor")
    got = torch.compile(loss_fn, backend=backend, fullgraph=True, **kw)(h, w, y)
    # eager rounds the float64 logits to float32 (.float()); the op keeps float64 arithmetic
    torch.testing.assert_close(got, loss_fn(h, w, y), rtol=1e-6, atol=1e-7)
    assert len(seen) == 1 and seen[0][1], seen
    assert expect.items() <= seen[0][0].items(), seen


def test_mode_reaches_other_inner_backends_as_torch_compile_passes_it():
    got = []

    def my_backend(gm, example_inputs, **kwargs):
        got.append(kwargs)
        return gm.forward
    h, w, b, y = make_inputs(d=D, v=V)
    torch.compile(loss_fn, backend=B.make_backend(my_backend), mode="reduce-overhead")(h, w, y)
    assert got == [{"mode": "reduce-overhead"}]


def test_unknown_inductor_option_is_reported():
    h, w, b, y = make_inputs(d=D, v=V)
    with pytest.raises(Exception, match="not_an_inductor_option"):
        torch.compile(loss_fn, backend="cce", options={"not_an_inductor_option": 1})(h, w, y)


class _CountingPass(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "counting-pass-v1"


def test_install_runs_in_plain_compile_and_uninstalls():
    h, w, b, y = make_inputs(d=D, v=V, dtype=torch.float32)
    assert inductor_config.pre_grad_custom_pass is None
    with B.install():
        assert B.is_installed()
        with B.install():  # nested: idempotent, does not uninstall the outer one on exit
            pass
        assert B.is_installed()
        out = torch.compile(loss_fn)(h, w, y)
        out.backward()
    assert inductor_config.pre_grad_custom_pass is None and not B.is_installed()
    g = h.grad.clone()
    h.grad = None
    ref = loss_fn(h, w, y)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, h.grad, rtol=1e-5, atol=1e-6)


def test_install_composes_with_user_pass():
    user = _CountingPass()
    with inductor_config.patch(pre_grad_custom_pass=user):
        B.install()
        try:
            p = inductor_config.pre_grad_custom_pass
            assert isinstance(p, B.ComposedPass) and p.passes[0] is user
            assert p.uuid() == ("cce_inductor.composed", ("counting-pass-v1", B.CCEGraphPass().uuid()))
            results = []
            # drive the installed pass directly on a Dynamo graph (no Inductor compile: fast)

            def grab(gm, ex):
                inductor_config.pre_grad_custom_pass(gm.graph)
                gm.recompile()
                results.append(_op_in_graph(gm))
                return gm.forward
            h, w, b, y = make_inputs(d=D, v=V)
            torch.compile(loss_fn, backend=grab)(h, w, y)
            assert user.calls == 1 and results == [True]
        finally:
            B.uninstall()
        assert inductor_config.pre_grad_custom_pass is user


def test_install_composes_with_list_of_passes():
    a, b = _CountingPass(), _CountingPass()
    with inductor_config.patch(pre_grad_custom_pass=[a, b]):
        with B.install():
            p = inductor_config.pre_grad_custom_pass
            assert isinstance(p, B.ComposedPass) and p.passes[:2] == (a, b)
        assert inductor_config.pre_grad_custom_pass == [a, b]


def test_uuid_is_stable_and_truthy():
    u1, u2 = B.CCEGraphPass().uuid(), B.CCEGraphPass().uuid()
    assert u1 and u1 == u2
    assert any(p.endswith(os.path.join("rewrite", "graph_pass.py")) for p in B._source_files())


def test_explain_report(capsys):
    h, w, b, y = make_inputs(d=D, v=V)
    cw = torch.rand(V, dtype=torch.float64)

    def f(h, w, b, y):
        a = F.cross_entropy(F.linear(h, w, b)[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1), label_smoothing=0.1)
        c = F.cross_entropy((h @ w.T).view(-1, V), y.view(-1), weight=cw)  # class weights: left alone
        return a + c
    report = explain(f, h, w, b, y)
    assert len(report.rewrites) == 1 and len(report.misses) == 1
    r = report.rewrites[0]
    assert (r.N, r.D, r.V) == (8, D, V) and r.options["label_smoothing"] == 0.1 and r.options["bias"]
    assert "test_rewrite_backend.py" in r.where and "F.cross_entropy" in r.where
    assert r.saved_bytes and r.saved_bytes > 0
    assert "weight" in report.misses[0].reason
    print(report)
    text = capsys.readouterr().out
    assert "Rewritten:" in text and "Left alone:" in text and "label_smoothing=0.1" in text
    # no compiled code left behind
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    assert not _debug_get_cache_entry_list(f.__code__)


def test_explain_with_graph_break():
    h, w, b, y = make_inputs(d=D, v=V)

    def f(h, w, y):
        z = h @ w.T
        print("graph break")  # noqa: T201
        return F.cross_entropy(z.view(-1, V), y.view(-1))
    report = explain(f, h, w, y)
    # the matmul and the loss end up in different graphs: nothing to rewrite, and the report says why
    assert report.graphs >= 2 and not report.rewrites
    assert len(report.misses) == 1 and "graph break" in report.misses[0].reason


def test_explain_reports_a_skipped_frame_once():
    """A graph break inside a loop makes Dynamo run the whole frame eagerly: explain says so, and a later
    explain of another function does not repeat it (Dynamo's graph-break counters are process-wide)."""
    h, w, b, y = make_inputs(d=D, v=V)

    def looped(h, w, y):
        x = h
        for _ in range(2):
            x = x * 2
            torch._dynamo.graph_break()
        return F.cross_entropy((x @ w.T).reshape(-1, V), y.reshape(-1))
    first = explain(looped, h, w, y)
    assert any("looped" in n and "ran eagerly" in n for n in first.notes), first.notes
    second = explain(loss_fn, h, w, y)
    assert len(second.rewrites) == 1 and not second.notes, second.notes


def test_explain_does_not_blame_a_graph_break_for_other_losses():
    """Logits computed inside the graph by something that is not a matmul: no rewrite, no report."""
    h, w, b, y = make_inputs(d=D, v=V)
    report = explain(lambda h, y: F.cross_entropy((h[..., :1] * h[..., :1].mean(-1, keepdim=True)).expand(
        *h.shape[:-1], V).reshape(-1, V), y.view(-1)), h, y)
    assert not report.rewrites and not report.misses


def test_logging(caplog):
    h, w, b, y = make_inputs(d=D, v=V)
    with caplog.at_level(logging.INFO, logger="cce_inductor"):
        check(loss_fn, (h, w, y), 1)
    assert any("rewrote cross_entropy" in rec.getMessage() for rec in caplog.records)


@pytest.mark.slow
def test_torch_logs_shows_our_logger(tmp_path):
    """``TORCH_LOGS=cce_inductor`` turns our INFO lines on (registered with torch._logging)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "s.py"
    script.write_text(
        "import torch, torch.nn.functional as F\n"
        "import cce_inductor.backend as B\n"
        "h = torch.randn(2, 3, 4); w = torch.randn(5, 4); y = torch.randint(0, 5, (2, 3))\n"
        "torch.compile(lambda h, w, y: F.cross_entropy((h @ w.T).view(-1, 5), y.view(-1)),\n"
        "              backend=B.make_backend('eager'))(h, w, y)\n")
    env = dict(os.environ, TORCH_LOGS="cce_inductor")
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "rewrote cross_entropy" in p.stderr, p.stderr[-2000:]


def test_tensor_subclass_weight_is_left_alone():
    """A tensor subclass (a sharded DTensor in real use; TwoTensor here) has no rule for the cce op:
    the loss is left exactly as it was and the report says why."""
    from torch.testing._internal.two_tensor import TwoTensor

    torch.manual_seed(0)
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    wt = TwoTensor(w.clone(), w.clone())

    def f(h, w, t):
        return F.cross_entropy(F.linear(h, w).float(), t)
    report = explain(f, h, wt, t)
    assert not report.rewrites and len(report.misses) == 1 and "tensor subclass" in report.misses[0].reason
    out = torch.compile(f, backend=B.make_backend("aot_eager"))(h, wt, t)
    torch.testing.assert_close(out.a, f(h, w, t))
    torch.testing.assert_close(out.b, f(h, w, t))


@pytest.mark.slow
def test_backend_name_works_without_importing_us(tmp_path):
    """``backend="cce"`` resolves through the ``torch_dynamo_backends`` entry point of the installed
    package: the user's script never imports cce_inductor."""
    import subprocess
    import sys

    code = (
        "import sys, torch, torch.nn.functional as F\n"
        "f = torch.compile(lambda e, c, t: F.cross_entropy((e @ c.T).float(), t), backend='cce')\n"
        "e = torch.randn(8, 16); c = torch.randn(50, 16); t = torch.randint(0, 50, (8,))\n"
        "l = f(e, c, t)\n"
        "print('cce_inductor' in sys.modules, abs(l.item() - F.cross_entropy(e @ c.T, t).item()) < 1e-5)\n")
    env = dict(os.environ, TORCH_LOGS="cce_inductor")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["True", "True"]
    assert "rewrote cross_entropy" in p.stderr
