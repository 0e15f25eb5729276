"""A Hugging Face ``LlamaForCausalLM`` trained with ``transformers.Trainer`` and Cut Cross-Entropy,
without touching the model's code: the rewrite finds Llama's own lm-head + loss in the compiled step.

    python examples/hf_trainer.py                 # CPU: a small Llama, a few dozen steps
    python examples/hf_trainer.py --baseline      # also train with plain Inductor and compare memory
    python examples/hf_trainer.py --gradient-checkpointing
    python examples/hf_trainer.py --device cuda   # a bigger Llama in bf16

Ways to switch it on (``--how``):

* ``integration`` (default): ``cce_inductor.integrations.transformers.enable(trainer)``. The Trainer's
  ``torch_compile=True`` compiles the whole model, whose output holds the logits, so they would be formed
  anyway; ``enable`` makes the training step compile ``model(**inputs).loss`` instead (the Trainer's own
  ``compute_loss`` still runs, ``num_items_in_batch`` included), so the logits are never formed, with or
  without gradient checkpointing. ``report(trainer)`` shows what the rewrite did in that step.
* ``install``: ``cce_inductor.install()`` + ``TrainingArguments(torch_compile=True)`` alone. The whole model
  is compiled, its output holds the logits, so the pass leaves the loss to Inductor (computing the logits
  a second time would be slower): no ``cce`` op runs, and ``explain`` says why.
* ``backend``: ``TrainingArguments(torch_compile=True, torch_compile_backend="cce")``, the backend name alone.
  Trainer hands the name to ``accelerate``'s ``TorchDynamoPlugin``, which (accelerate 1.2 - 1.16 at least)
  only accepts the names in its ``DynamoBackend`` enum and rejects "cce" with
  ``ValueError: 'CCE' is not a valid DynamoBackend``; this script then says so and stops.

The model is built from a small ``LlamaConfig`` (no download) and trained on the same data as
``train_lm.py``: the Python standard library's sources, BPE-tokenized locally, as blocks of tokens.
During training one step is profiled to show the ``cce::`` op really ran and how much memory it took.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _data  # noqa: E402

PRESETS = {
    "cpu": dict(hidden=128, layers=2, heads=4, kv_heads=2, seq=128, batch=8, steps=30, lr=2e-3, vocab=32768,
                corpus_bytes=4_000_000),
    "cuda": dict(hidden=1024, layers=8, heads=16, kv_heads=8, seq=1024, batch=8, steps=60, lr=6e-4, vocab=65536,
                 corpus_bytes=16_000_000),
    "tiny": dict(hidden=32, layers=1, heads=2, kv_heads=1, seq=32, batch=4, steps=4, lr=3e-3, vocab=512,
                 corpus_bytes=300_000),
}


def build_model(p, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=int(p["hidden"] * 8 / 3) // 8 * 8,
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                      max_position_embeddings=p["seq"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")


def make_trainer(model, dataset, p, device, how, probe_step, out_dir, checkpointing=False):
    from transformers import Trainer, TrainingArguments

    class ProbedTrainer(Trainer):
        """Profiles one training step (forward + backward): peak memory and cce op calls."""

        probe = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step != probe_step:
                return super().training_step(model, inputs, num_items_in_batch)
            out, peak, calls = _data.profile_step(
                lambda: super(ProbedTrainer, self).training_step(model, inputs, num_items_in_batch), device)
            self.probe = dict(peak_bytes=peak, cce_calls=calls)
            return out

    args = TrainingArguments(
        output_dir=out_dir, max_steps=p["steps"], per_device_train_batch_size=p["batch"], learning_rate=p["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, max_grad_norm=1.0,
        logging_steps=1, logging_strategy="steps", save_strategy="no", report_to="none",
        use_cpu=device.type != "cuda", bf16=device.type == "cuda", dataloader_num_workers=0,
        disable_tqdm=False, seed=0, data_seed=0, gradient_checkpointing=checkpointing,
        torch_compile=True, torch_compile_backend="cce" if how == "backend" else "inductor",
    )
    trainer = ProbedTrainer(model=model, args=args, train_dataset=dataset)
    if how == "integration":
        from cce_inductor.integrations import transformers as cce_transformers

        cce_transformers.enable(trainer)  # the one line: the training step compiles the loss alone
    return trainer


def run(p, device, how, dataset, probe_step=1, checkpointing=False):
    """Train one model; returns dict(losses, peak_bytes, cce_calls, report)."""
    import cce_inductor

    torch._dynamo.reset()
    model = build_model(p).to(device)
    # "backend" (the name alone), "integration" and "none" (plain Inductor, the baseline) install nothing
    with tempfile.TemporaryDirectory(prefix="cce_hf_") as out_dir, \
            cce_inductor.install() if how == "install" else contextlib.nullcontext():
        trainer = make_trainer(model, dataset, p, device, how, probe_step, out_dir, checkpointing)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    report = None
    if how == "integration":
        from cce_inductor.integrations import transformers as cce_transformers

        report = cce_transformers.report(trainer)
    return dict(losses=losses, report=report,
                **(trainer.probe or dict(peak_bytes=float("nan"), cce_calls=0)))


def explain_whole_model(p, dataset, device):
    """What ``cce_inductor.explain`` reports for the Trainer's default compile (the whole model)."""
    import cce_inductor

    model = build_model(p).to(device)
    batch = torch.stack([dataset[i]["input_ids"] for i in range(p["batch"])]).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return cce_inductor.explain(model, input_ids=batch, labels=batch)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--how", default="integration", choices=["integration", "install", "backend"],
                    help="integration: integrations.transformers.enable(trainer); install: cce_inductor.install() + "
                         "torch_compile=True (the whole model: logits kept); backend: torch_compile_backend='cce'")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="TrainingArguments(gradient_checkpointing=True)")
    ap.add_argument("--baseline", action="store_true", help="also train with plain Inductor and compare memory")
    ap.add_argument("--tiny", action="store_true", help="tiny model and vocab, few steps (tests)")
    ap.add_argument("--cache-dir", default=str(_data.DEFAULT_CACHE))
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    p = dict(PRESETS["tiny" if args.tiny else ("cuda" if device.type == "cuda" else "cpu")])
    if args.steps is not None:
        p["steps"] = max(args.steps, 3)
    if args.vocab_size is not None:
        p["vocab"] = args.vocab_size
    tokens = _data.get_tokens(p["vocab"], p["corpus_bytes"], args.cache_dir)
    dataset = _data.TokenBlocks(tokens, p["seq"])
    print(f"LlamaForCausalLM hidden={p['hidden']} layers={p['layers']} vocab={p['vocab']} | "
          f"{len(dataset)} blocks of {p['seq']} tokens, batch {p['batch']}, {p['steps']} steps on {device}"
          + (", gradient checkpointing" if args.gradient_checkpointing else ""))

    if args.how == "install":
        print("\nThe Trainer compiles the whole model (torch_compile=True); explain on that:")
        print(explain_whole_model(p, dataset, device))

    runs = {}
    try:
        runs[args.how] = run(p, device, args.how, dataset, checkpointing=args.gradient_checkpointing)
    except ValueError as ex:
        if args.how == "backend" and "DynamoBackend" in str(ex):
            print(f"\nTrainer could not take torch_compile_backend='cce': {ex}\n"
                  "accelerate's TorchDynamoPlugin accepts only its DynamoBackend enum names. Use --how integration "
                  "(cce_inductor.integrations.transformers.enable(trainer)), or compile the loss yourself with "
                  "torch.compile(lambda ...: model(...).loss, backend='cce') outside Trainer.")
            return dict(report=None, runs=runs, error=str(ex))
        raise
    report = runs[args.how]["report"]
    if report is not None:
        print("\nWhat the rewrite did in the Trainer's training step (cce_inductor.integrations.transformers.report):")
        print(report)
    if args.baseline:
        runs["none"] = run(p, device, "none", dataset, checkpointing=args.gradient_checkpointing)

    names = {"integration": "Inductor + integrations.transformers", "install": "Inductor + cce_inductor.install()",
             "backend": 'backend="cce"', "none": "Inductor (no cce)"}
    print(f"\n{'Trainer run':38s} {'peak MB (fwd+bwd)':>18s} {'cce op calls':>13s} {'first loss':>11s} {'last loss':>10s}")
    for k, r in runs.items():
        print(f"{names[k]:38s} {r['peak_bytes'] / 2**20:18.1f} {r['cce_calls']:13d} {r['losses'][0]:11.4f} "
              f"{r['losses'][-1]:10.4f}")
    return dict(report=report, runs=runs, rewrites=len(report.rewrites) if report is not None else 0)


if __name__ == "__main__":
    main()
