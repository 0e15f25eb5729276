"""Tiny Hugging Face pieces the integration tests share: a 2-layer Llama from a config (no download), a
token dataset, TrainingArguments for a few CPU steps, and parameter comparison."""
from __future__ import annotations

import torch

V = 97


def llama(seed: int = 0, layers: int = 2, dtype=torch.float32):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return T.LlamaForCausalLM(cfg).to(dtype)


def token_rows(n: int = 8, length: int = 12, seed: int = 1) -> list:
    """``n`` rows of ``{"input_ids", "labels"}`` (the first two labels ignored)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, V, (length,), generator=g)
        labels = ids.clone()
        labels[:2] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def batch(n: int = 2, length: int = 12, seed: int = 1) -> dict:
    rows = token_rows(n, length, seed)
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def training_args(out_dir: str, **kw):
    """A few deterministic CPU steps with gradient accumulation (so the Trainer passes num_items_in_batch).
    Plain SGD without clipping: the parameters after a step move by the gradient itself (Adam's first steps
    move by its sign, and clipping rescales it, which would hide a wrongly scaled loss)."""
    import transformers as T

    base = dict(output_dir=out_dir, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                use_cpu=True, report_to="none", save_strategy="no", learning_rate=0.5, lr_scheduler_type="constant",
                optim="sgd", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, seed=0, data_seed=0,
                dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return T.TrainingArguments(**base)


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module, rtol=1e-4, atol=1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def losses(trainer) -> list:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]
