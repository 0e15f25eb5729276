"""Hugging Face models from tiny configs (no downloads): the rewrite fires once and is exact.

Two ways each model reaches the compiler:

* ``torch.compile(lambda ids, labels: model(input_ids=ids, labels=labels).loss, fullgraph=True)``
* ``torch.compile(model)`` (what HF Trainer does): the graph also returns the logits, so they are formed
  anyway; the op would compute them a second time, so the loss is left to Inductor and ``explain`` says
  why and what to write instead (compile a function returning only the loss, or
  ``cce_inductor.integrations.transformers`` under the Trainer).

GPT-2 (and the other HF classes with ``loss_type=None``) graph-break between lm_head and the loss on a
``logger.warning_once``; setting ``model.loss_type = "ForCausalLM"`` keeps one graph, and the rewrite
then fires (without it the matmul and the loss are in different graphs and nothing can be rewritten).

Models are float64 and in eval mode (no dropout) so every comparison is tight; HF's loss upcasts the
logits with ``.float()``, so eager computes its cross-entropy in fp32: tolerances are fp32-level.
"""
from __future__ import annotations

import pytest
import torch

from cce_inductor.backend import make_backend
from helpers import _reset_dynamo, counting_installed_pass  # noqa: F401

T = pytest.importorskip("transformers")

V = 97
COMMON = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              max_position_embeddings=64)

MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=1)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_key_value_heads=1, head_dim=8,
                                                         final_logit_softcapping=5.0)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=1, pad_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict()),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=1)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                                   bos_token_id=0, eos_token_id=0)),
    "bert_mlm": ("BertConfig", "BertForMaskedLM", dict()),
    # more lm-head spellings: logits * logit_scale (Cohere, tied), logits / logits_scaling (Granite),
    # an lm_head bias (Phi), encoder-decoder with the decoder output scaled before a tied head (T5), MoE
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(num_key_value_heads=1, logit_scale=0.5)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(num_key_value_heads=1, logits_scaling=4.0)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict()),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=1, head_dim=8)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_key_value_heads=1, head_dim=8,
                                                             final_logit_softcapping=5.0)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_key_value_heads=1, num_local_experts=2,
                                                          num_experts_per_tok=1)),
    # use_cache=False: T5 builds a decoder cache by deep-copying its config, which torch 2.11's Dynamo cannot trace
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                                          decoder_start_token_id=0, pad_token_id=0, use_cache=False)),
}
# expected op options of the rewrite, where a model sets one
OPTIONS = {"gemma2": {"softcap": 5.0}, "gemma3": {"softcap": 5.0}, "bert_mlm": {"bias": "float64"},
           "phi": {"bias": "float64"}, "cohere": {"logit_scale": 0.5}, "granite": {"logit_scale": 0.25}}
# MoE experts run a grouped matmul that has no float64 kernel on the CPU
FLOAT32 = {"mixtral"}


def _skip_upstream(name):
    """Mixtral's experts (transformers' grouped-matmul fallback) do not trace under torch.compile before
    transformers 5.23 (a data-dependent guard in its backward, with or without cce_inductor)."""
    if name == "mixtral" and tuple(int(p) for p in T.__version__.split(".")[:2]) < (5, 23):
        pytest.skip(f"transformers {T.__version__}: MoE experts do not compile before 5.23 (upstream)")


def _model(name):
    _skip_upstream(name)
    cfg_cls, model_cls, extra = MODELS[name]
    torch.manual_seed(0)
    model = getattr(T, model_cls)(getattr(T, cfg_cls)(**COMMON, **extra)).eval()
    model = model.float() if name in FLOAT32 else model.double()
    if name == "gpt2":
        model.loss_type = "ForCausalLM"  # the documented workaround for GPT-2's graph break
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    return ids, labels


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_grads_close(got, want):
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), i
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"param {i}: {m}")


def _check_loss_lambda(model):
    """Compile ``model(input_ids, labels).loss`` (aot_eager behind the rewrite), assert one rewrite and
    exact loss and gradients; returns the rewrite."""
    ids, labels = _batch()
    results = []

    def f(ids, labels):
        return model(input_ids=ids, labels=labels).loss
    compiled = torch.compile(f, backend=make_backend("aot_eager", on_result=results.append), fullgraph=True)
    got = compiled(ids, labels)
    got_g = _grads(model, got)
    want = f(ids, labels)
    want_g = _grads(model, want)
    assert len(results[-1].rewrites) == 1, (results[-1].rewrites, results[-1].misses)
    assert not results[-1].misses, results[-1].misses  # nothing else reported (MoE routers, attention: not lm-heads)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _assert_grads_close(got_g, want_g)
    return results[-1].rewrites[0]


# The families of the default run: one of each spelling the rewrite meets (plain llama head, Gemma's softcap,
# BERT's positional CrossEntropyLoss with a bias, GPT-2's loss_type fix, Cohere's tied head times a scale);
# the other families run in CI's slow step.
QUICK = {"llama", "gemma2", "bert_mlm", "gpt2", "cohere"}
FAMILIES = [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in MODELS]
# Compiling the whole model leaves every family's loss to Inductor for the same reason (the logits are an
# output): the default run checks one family, CI's slow step all of them.
WHOLE_MODEL = [pytest.param(n, marks=() if n == "llama" else pytest.mark.slow) for n in MODELS]


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_loss_lambda(name):
    r = _check_loss_lambda(_model(name))
    for key, value in OPTIONS.get(name, {}).items():
        assert r.options.get(key) == pytest.approx(value), (key, r.options)
    assert not r.logits_kept


@pytest.mark.parametrize("name", WHOLE_MODEL)
def test_hf_whole_model_compiled(name):
    """torch.compile(model): the logits are a graph output too, so the loss is left to Inductor (one miss,
    saying so); loss, logits and all gradients (through both the loss and the logits) equal eager's."""
    model = _model(name)
    ids, labels = _batch()
    results = []
    compiled = torch.compile(model, backend=make_backend("aot_eager", on_result=results.append))
    out = compiled(input_ids=ids, labels=labels)
    got_g = _grads(model, out.loss + 1e-2 * out.logits.float().square().mean())
    ref = model(input_ids=ids, labels=labels)
    want_g = _grads(model, ref.loss + 1e-2 * ref.logits.float().square().mean())
    assert not [r for res in results for r in res.rewrites]
    misses = {m.where: m for res in results for m in res.misses}
    assert len(misses) == 1, [res.misses for res in results]
    miss = next(iter(misses.values()))
    assert miss.category == "logits_kept" and "needed by a graph output" in miss.reason, miss
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-9, atol=1e-9)
    _assert_grads_close(got_g, want_g)


def test_hf_num_items_in_batch_and_inductor():
    """``num_items_in_batch`` (reduction='sum' then a division: downstream math), through full Inductor."""
    model = _model("llama").float()
    ids, labels = _batch()
    n = torch.tensor(11)
    results = []

    def f(ids, labels, n):
        return model(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    compiled = torch.compile(f, backend=make_backend("inductor", on_result=results.append), fullgraph=True)
    got = compiled(ids, labels, n)
    got_g = _grads(model, got)
    want = f(ids, labels, n)
    want_g = _grads(model, want)
    assert len(results[-1].rewrites) == 1 and results[-1].rewrites[0].options["reduction"] == "sum"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_g, want_g):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_hf_install_plain_torch_compile_inductor():
    """``cce_inductor.install()`` + plain ``torch.compile(model)`` (Inductor, as HF Trainer compiles): the
    logits are returned, so the pass leaves the loss to Inductor (no op, one miss); values equal eager's."""
    model = _model("llama").float()
    ids, labels = _batch()
    with counting_installed_pass() as seen:
        out = torch.compile(model)(input_ids=ids, labels=labels)
        got_g = _grads(model, out.loss)
    ref = model(input_ids=ids, labels=labels)
    want_g = _grads(model, ref.loss)
    assert (seen.rewrites, seen.misses) == (0, 1), seen
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_g, want_g):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_hf_install_loss_only_inductor():
    """``cce_inductor.install()`` + ``torch.compile`` of a function returning only the loss: one rewrite."""
    model = _model("llama").float()
    ids, labels = _batch()
    with counting_installed_pass() as seen:
        got = torch.compile(lambda ids, labels: model(input_ids=ids, labels=labels).loss)(ids, labels)
        got_g = _grads(model, got)
    want = model(input_ids=ids, labels=labels).loss
    want_g = _grads(model, want)
    assert (seen.rewrites, seen.misses) == (1, 0), seen
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_g, want_g):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # (the quick run has tests/test_checkpointing.py's recipe and no-recipe cases)
def test_hf_gradient_checkpointing():
    """``model.gradient_checkpointing_enable()`` with the documented recipe (README, "Gradient
    checkpointing"): ``use_cache=False`` and Dynamo's ``skip_fwd_side_effects_in_bwd_under_checkpoint``
    (transformers >= 5 sets a module-level context variable inside each checkpointed layer; Dynamo refuses
    to trace that side effect into a checkpoint unless told it need not be replayed in the backward).
    Then the decoder layers become checkpointed subgraphs of one graph, the lm-head + loss is rewritten
    with its logits dead, and loss and gradients stay exact."""
    model = _model("llama")
    model.config.use_cache = False  # HF warns (a graph break) about caching under checkpointing otherwise
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        r = _check_loss_lambda(model)
    assert not r.logits_kept


@pytest.mark.slow  # (the quick run has tests/test_checkpointing.py's recipe and no-recipe cases)
def test_hf_gradient_checkpointing_without_the_recipe_stays_exact():
    """Checkpointing as a user first writes it (no recipe, no ``fullgraph``): whatever Dynamo does with the
    checkpointed layers (on transformers >= 5 it breaks the graph around them), loss and gradients equal
    eager's."""
    model = _model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, labels = _batch()

    def f(ids, labels):
        return model(input_ids=ids, labels=labels).loss
    got = torch.compile(f, backend=make_backend("aot_eager"))(ids, labels)
    got_g = _grads(model, got)
    want = f(ids, labels)
    want_g = _grads(model, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _assert_grads_close(got_g, want_g)
