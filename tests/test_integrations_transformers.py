"""``cce_inductor.integrations.transformers``: the HF Trainer and custom loops with the logits never formed.

Each Trainer test trains a tiny Llama for two optimizer steps (two micro-batches each, so the Trainer passes
``num_items_in_batch``) and compares the parameters (plain SGD, no clipping: they move by the gradient
itself) and the logged losses with a plain eager Trainer run, and reads what the rewrite did from the
integration's report (filled by the real compile of the Trainer's step).
"""
from __future__ import annotations

import pytest
import torch

import hf_tiny
from helpers import _reset_dynamo, counting_installed_pass  # noqa: F401

T = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
cit = pytest.importorskip("cce_inductor.integrations.transformers")


def _train(tmp_path, name, trainer_cls=None, enable=False, model=None, **args):
    torch._dynamo.reset()
    model = model if model is not None else hf_tiny.llama()
    trainer = (trainer_cls or T.Trainer)(model=model, args=hf_tiny.training_args(str(tmp_path / name), **args),
                                         train_dataset=hf_tiny.token_rows())
    if enable:
        cit.enable(trainer, backend="aot_eager")
    trainer.train()
    return model, trainer


def _check_against_eager(tmp_path, got_model, got_trainer, **args):
    want_model, want_trainer = _train(tmp_path, "eager", **args)
    assert hf_tiny.losses(got_trainer) == pytest.approx(hf_tiny.losses(want_trainer), rel=1e-5)
    hf_tiny.assert_same_parameters(got_model, want_model)


def _assert_one_rewrite_logits_dead(report):
    assert len(report.rewrites) == 1 and not report.misses, report
    r = report.rewrites[0]
    assert not r.logits_kept and r.options["reduction"] == "sum", r  # sum / num_items_in_batch, as the Trainer asks


@pytest.mark.parametrize("torch_compile", [True, False])
def test_trainer_enable(tmp_path, torch_compile):
    """``enable(trainer)``: one rewrite, logits dead, training equal to the plain eager Trainer's. With
    ``torch_compile=True`` the Trainer hands the step its compiled model; the step compiles the loss alone."""
    extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if torch_compile else {}
    model, trainer = _train(tmp_path, "cce", enable=True, **extra)
    _assert_one_rewrite_logits_dead(cit.report(trainer))
    _check_against_eager(tmp_path, model, trainer)


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [False, True])
def test_trainer_enable_gradient_checkpointing(tmp_path, reentrant):
    """``Trainer(gradient_checkpointing=True, torch_compile=True)``: the layers are compiled as checkpointed
    regions (the step sets Dynamo's side-effect flag), no graph break, one rewrite, training equal to eager's."""
    ckpt = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model, trainer = _train(tmp_path, "cce", enable=True, torch_compile=True, torch_compile_backend="aot_eager",
                            **ckpt)
    report = cit.report(trainer)
    _assert_one_rewrite_logits_dead(report)
    assert not report.breaks and not report.notes, report
    assert any("activation checkpointing is on" in n for n in report.findings), report
    _check_against_eager(tmp_path, model, trainer, **ckpt)


def test_trainer_mixin(tmp_path):
    class CCETrainer(cit.CCETrainerMixin, T.Trainer):
        cce_backend = "aot_eager"

    model, trainer = _train(tmp_path, "cce", trainer_cls=CCETrainer)
    _assert_one_rewrite_logits_dead(cit.report(trainer))
    _check_against_eager(tmp_path, model, trainer)


def test_trainer_compute_loss_func_is_left_as_it_is(tmp_path):
    """A compute_loss_func receives outputs.logits: the model call stays, nothing is compiled by the step,
    and the report says why."""
    def ce(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, hf_tiny.V), labels[:, 1:].reshape(-1),
                                                 reduction="sum") / num_items_in_batch

    torch._dynamo.reset()
    model = hf_tiny.llama()
    trainer = T.Trainer(model=model, args=hf_tiny.training_args(str(tmp_path / "cce")),
                        train_dataset=hf_tiny.token_rows(), compute_loss_func=ce)
    cit.enable(trainer, backend="aot_eager")
    trainer.train()
    report = cit.report(trainer)
    assert not report.rewrites and report.graphs == 0
    assert any("compute_loss_func receives outputs.logits" in n for n in report.findings), report


def test_loss_step_in_a_custom_loop():
    """``LossStep`` for a loop of one's own (accelerate's, a plain one): the loss and every gradient equal
    eager's, one rewrite; ``explain`` on the same step says the same."""
    model = hf_tiny.llama(dtype=torch.float64).train()
    inputs = hf_tiny.batch()
    step = cit.LossStep("aot_eager")
    got = step(model, **inputs)
    got_g = torch.autograd.grad(got, list(model.parameters()))
    want = model(**inputs).loss
    want_g = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert len(step.report.rewrites) == 1 and not step.report.rewrites[0].logits_kept
    again = step.explain(model, **inputs)
    assert len(again.rewrites) == 1 and not again.misses


def test_accelerate_prepared_model_through_loss_step():
    """accelerate: ``Accelerator().prepare(model, optimizer)``, then the loss from a LossStep and
    ``accelerator.backward``: one rewrite, the step's parameters equal an eager step's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    inputs = hf_tiny.batch()

    def one_step(use_step):
        torch._dynamo.reset()
        AcceleratorState._reset_state(reset_partial_state=True)  # not a state an earlier Trainer left behind
        acc = Accelerator(cpu=True)
        model = hf_tiny.llama(dtype=torch.float64).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model, opt = acc.prepare(model, opt)
        step = cit.LossStep("aot_eager")
        loss = step(model, **inputs) if use_step else model(**inputs).loss
        acc.backward(loss)
        opt.step()
        return model, step

    got, step = one_step(True)
    want, _ = one_step(False)
    assert len(step.report.rewrites) == 1
    hf_tiny.assert_same_parameters(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_plain_trainer_torch_compile_keeps_the_logits(tmp_path):
    """What the integration fixes: ``Trainer(torch_compile=True)`` + ``cce_inductor.install()`` compiles the
    whole model, whose output holds the logits: the pass leaves the loss to Inductor (one miss, no rewrite)
    and training equals eager's."""
    with counting_installed_pass() as seen:
        model, trainer = _train(tmp_path, "compiled", torch_compile=True)
    assert seen.rewrites == 0 and seen.misses >= 1, seen
    _check_against_eager(tmp_path, model, trainer)


@pytest.mark.slow
def test_accelerate_compiling_the_model_keeps_the_logits():
    """accelerate's own compile (``Accelerator(dynamo_backend="inductor")``, what the Trainer's torch_compile
    uses) + ``cce_inductor.install()``: the whole model is compiled, the logits are returned, the pass leaves the
    loss to Inductor; values are eager's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a Trainer earlier in the process set it up (no compile)
    inputs = hf_tiny.batch()
    model = hf_tiny.llama().train()
    with counting_installed_pass() as seen:
        prepared = Accelerator(cpu=True, dynamo_backend="inductor").prepare(model)
        got = prepared(**inputs).loss
    AcceleratorState._reset_state(reset_partial_state=True)
    assert isinstance(prepared, torch._dynamo.eval_frame.OptimizedModule)
    assert seen.rewrites == 0 and seen.misses == 1, seen
    torch.testing.assert_close(got, model(**inputs).loss, rtol=1e-5, atol=1e-6)
