"""What the rewrite does under PEFT, TRL and Lightning (the README's integrations table): each row's claim
is asserted here, so a library release that changes the behaviour fails a test. Tiny models, CPU, aot_eager
behind the rewrite."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cce_inductor
import hf_tiny
from cce_inductor.backend import make_backend
from helpers import _reset_dynamo, compile_counting  # noqa: F401

T = pytest.importorskip("transformers")


def _loss_and_grads(fn, params, *args):
    loss = fn(*args)
    return loss.detach(), torch.autograd.grad(loss, params)


def _assert_close(got, want, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    for i, (g, w) in enumerate(zip(got[1], want[1])):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"grad {i}: {m}")


# ---- PEFT --------------------------------------------------------------------------------------------------

def _peft_model(targets, dropout=0.0):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(hf_tiny.llama(dtype=torch.float64),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: make the adapters matter
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "v_proj", "lm_head"]],
                         ids=["attention", "attention_and_lm_head"])
def test_peft_lora(targets):
    """LoRA on attention: the lm-head is the plain linear. LoRA on the lm-head too: its adapter is folded
    into the op (``[h, s·u] @ [W, B].T``). One rewrite each, loss and every trainable gradient eager's."""
    model = _peft_model(targets)
    b = hf_tiny.batch()
    params = [p for p in model.parameters() if p.requires_grad]

    def f(ids, labels):
        return model(input_ids=ids, labels=labels).loss
    compiled, results = compile_counting(f)
    got = _loss_and_grads(compiled, params, b["input_ids"], b["labels"])
    want = _loss_and_grads(f, params, b["input_ids"], b["labels"])
    assert len(results[-1].rewrites) == 1 and not results[-1].misses, results
    assert ("LoRA (rank 4)" in results[-1].rewrites[0].spelling) == ("lm_head" in targets)
    _assert_close(got, want)


def test_peft_lora_lm_head_with_dropout():
    """lora_dropout > 0 in training: the dropout before lora_A stays in the graph (the op reads lora_A's
    output), so the rewrite draws the same mask: equal to the program compiled without it, same seed."""
    model = _peft_model(["lm_head"], dropout=0.25)
    b = hf_tiny.batch()
    params = [p for p in model.parameters() if p.requires_grad]

    def f(ids, labels):
        return model(input_ids=ids, labels=labels).loss
    compiled, results = compile_counting(f)
    torch.manual_seed(11)
    got = _loss_and_grads(compiled, params, b["input_ids"], b["labels"])
    torch._dynamo.reset()
    torch.manual_seed(11)
    want = _loss_and_grads(torch.compile(f, backend="aot_eager", fullgraph=True), params, b["input_ids"], b["labels"])
    assert len(results[-1].rewrites) == 1
    _assert_close(got, want)  # (HF's loss upcasts the logits with .float(): fp32 arithmetic)


@pytest.mark.slow
def test_peft_lora_under_the_trainer(tmp_path):
    """PEFT + Trainer + ``integrations.transformers.enable``: one rewrite (adapter folded), training equal to a
    plain eager Trainer's."""
    cit = pytest.importorskip("cce_inductor.integrations.transformers")

    def train(enable):
        torch._dynamo.reset()
        model = _peft_model(["q_proj", "lm_head"]).float()
        trainer = T.Trainer(model=model, args=hf_tiny.training_args(str(tmp_path / str(enable))),
                            train_dataset=hf_tiny.token_rows())
        if enable:
            cit.enable(trainer, backend="aot_eager")
        trainer.train()
        return model, trainer

    got, trainer = train(True)
    want, _ = train(False)
    report = cit.report(trainer)
    assert len(report.rewrites) == 1 and "LoRA" in report.rewrites[0].spelling and not report.misses, report
    hf_tiny.assert_same_parameters(got, want)


# ---- TRL ---------------------------------------------------------------------------------------------------

def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(hf_tiny.V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t1", eos_token="t2", unk_token="t0")


def _sft_trainer(tmp_path, **kw):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    rows = hf_tiny.token_rows()
    ds = datasets.Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in rows]})
    cfg = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                        report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                        torch_compile=True, torch_compile_backend="aot_eager")
    return trl.SFTTrainer(model=hf_tiny.llama(), args=cfg, train_dataset=ds, processing_class=_tokenizer(), **kw)


@pytest.mark.slow
def test_trl_sft_has_its_own_fused_lm_head(tmp_path):
    """TRL's SFTTrainer patches the model's forward with its own chunked lm-head (per-token log-probabilities,
    no N×V logits): there is no cross-entropy for the rewrite to find, and explain says where the lm-head went.
    ``enable`` leaves TRL's compute_loss as it is and notes why."""
    cit = pytest.importorskip("cce_inductor.integrations.transformers")
    trainer = _sft_trainer(tmp_path)
    b = hf_tiny.batch()
    report = cce_inductor.explain(
        lambda ids, labels: trainer.model(input_ids=ids, labels=labels, fused_lm_head=True).loss,
        b["input_ids"], b["labels"])
    assert not report.rewrites and not report.misses, report
    assert any("TRL's own fused lm-head" in n for n in report.notes), report
    cit.enable(trainer, backend="aot_eager")
    trainer.train()
    assert any("is not the Trainer's own" in n for n in cit.report(trainer).findings)


def test_trl_compute_loss_func_gets_graph_input_logits(tmp_path):
    """A compute_loss_func gets outputs.logits: compiled on its own, the logits are a graph input, and explain
    says so and what to write instead."""
    def ce(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs.logits[:, :-1].float().reshape(-1, hf_tiny.V), labels[:, 1:].reshape(-1))

    model = hf_tiny.llama()
    b = hf_tiny.batch()
    outputs = model(input_ids=b["input_ids"])
    report = cce_inductor.explain(ce, outputs, b["labels"])
    assert [m.category for m in report.misses] == ["graph_input"], report


# ---- Lightning ---------------------------------------------------------------------------------------------

V_L, D_L = 53, 8


def _lit_module(log_in_step: bool):
    L = pytest.importorskip("lightning")

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.body = nn.Embedding(V_L, D_L), nn.Linear(D_L, D_L)
            self.head = nn.Linear(D_L, V_L, bias=False)

        def forward(self, ids):
            return self.head(torch.tanh(self.body(self.embed(ids))))

        def training_step(self, batch, i):
            ids, labels = batch
            loss = F.cross_entropy(self(ids).float().view(-1, V_L), labels.view(-1))
            if log_in_step:
                self.log("loss", loss)
            return loss

        def on_train_batch_end(self, outputs, batch, i):  # not compiled: log here
            if not log_in_step:
                self.log("loss", outputs["loss"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return Lit(), L


def _fit(module, L):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V_L, (8, 7), generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, torch.roll(ids, -1, 1)), batch_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)


def test_lightning_compiled_module():
    """``torch.compile(lightning_module)``: Lightning compiles ``training_step`` (and ``forward``), so the
    lm-head + loss written there are one graph: rewritten, and the parameters after two steps are eager's."""
    results = []
    module, L = _lit_module(log_in_step=False)
    _fit(torch.compile(module, backend=make_backend("aot_eager", on_result=results.append)), L)
    torch._dynamo.reset()
    eager, _ = _lit_module(log_in_step=False)
    _fit(eager, L)
    assert sum(len(r.rewrites) for r in results) == 1, results
    hf_tiny.assert_same_parameters(module, eager)


@pytest.mark.parametrize("backend", ["aot_eager", "cce"])
def test_lightning_log_in_compiled_step_fails_upstream(backend):
    """``self.log(...)`` inside a compiled training_step fails in Dynamo with or without the rewrite (a
    Lightning/Dynamo limitation); the README's recipe logs in on_train_batch_end."""
    module, L = _lit_module(log_in_step=True)
    be = "aot_eager" if backend == "aot_eager" else make_backend("aot_eager")
    with pytest.raises(Exception, match="has no attribute '__dict__'"):
        _fit(torch.compile(module, backend=be), L)
