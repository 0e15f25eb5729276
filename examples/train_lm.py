"""Train one small GPT three ways — eager, torch.compile (Inductor), torch.compile(backend="cce") —
on real text, and compare peak memory, speed and loss.

The model's loss is written the plain way, ``F.cross_entropy(logits.view(-1, V).float(), targets.view(-1))``;
``backend="cce"`` finds the lm-head matmul + cross-entropy in the compiled graph and replaces them with
``cce_inductor``'s op, which never stores the N x V logits. Nothing else in the model changes.

Data: the Python standard library's own .py sources (present everywhere, no download), tokenized with
a byte-level BPE tokenizer (default 32768 tokens) trained locally on first use and cached
(``$CCE_CACHE_DIR`` or ``--cache-dir``, default ~/.cache/cce_inductor).

Every variant starts from the same initial weights and sees the same batches in the same order.

    python examples/train_lm.py                      # CPU, a few minutes including compiles
    python examples/train_lm.py --device cuda        # bigger model / batch / vocab on one GPU
    python examples/train_lm.py --tiny --inner aot_eager   # seconds; what the tests run
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _data  # noqa: E402

# --------------------------------------------------------------------------------------------- model


@dataclass
class GPTConfig:
    vocab_size: int = 32768
    seq_len: int = 128
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP, each with a residual."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        V = logits.shape[-1]
        return F.cross_entropy(logits.view(-1, V).float(), targets.view(-1))


# ------------------------------------------------------------------------------------------- presets

PRESETS = {
    "cpu": dict(d_model=64, n_layer=2, n_head=4, seq=128, batch=16, steps=30, lr=3e-3, vocab=32768,
                corpus_bytes=4_000_000),
    "cuda": dict(d_model=1024, n_layer=8, n_head=16, seq=1024, batch=8, steps=100, lr=6e-4, vocab=65536,
                 corpus_bytes=16_000_000),
    "tiny": dict(d_model=32, n_layer=1, n_head=2, seq=32, batch=4, steps=6, lr=3e-3, vocab=512,
                 corpus_bytes=300_000),
}


# ------------------------------------------------------------------------------------------ training


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(cfg: GPTConfig, device, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).to(device)


def compiled(model, variant: str, inner: str):
    if variant == "eager":
        return model
    if variant == "compile":
        return torch.compile(model, backend=inner)
    import cce_inductor

    backend = "cce" if inner == "inductor" else cce_inductor.make_backend(inner=inner)
    return torch.compile(model, backend=backend)


def train(variant, cfg, batches, lr, device, inner="inductor", measure_step=1, autocast=None, desc=None):
    """Train a fresh model (fixed seed) on ``batches``; returns a dict of losses, timings and memory."""
    from tqdm import tqdm

    torch._dynamo.reset()
    model = make_model(cfg, device)
    fn = compiled(model, variant, inner)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    def step(x, y):
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    losses, times, peak, cce_calls = [], [], None, 0
    for i, (x, y) in enumerate(tqdm(batches, desc=desc or variant, leave=False, dynamic_ncols=True)):
        x, y = x.to(device), y.to(device)
        _sync(device)
        t0 = time.perf_counter()
        if i == measure_step:
            loss, peak, cce_calls = _data.profile_step(lambda: step(x, y), device)
        else:
            loss = step(x, y)
            _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    # throughput excludes step 0 (compilation) and the profiled step
    timed = [t for i, t in enumerate(times) if i not in (0, measure_step)] or times[-1:]
    ntok = batches[0][0].numel()
    return dict(variant=variant, losses=losses, first_step_s=times[0], tokens_per_s=ntok / (sum(timed) / len(timed)),
                peak_bytes=peak, cce_calls=cce_calls)


def rewrite_report(cfg, batch, device):
    """``cce_inductor.explain`` on the model's loss: what the backend rewrites (and misses)."""
    import cce_inductor

    torch._dynamo.reset()
    model = make_model(cfg, device)
    x, y = batch[0].to(device), batch[1].to(device)
    return cce_inductor.explain(model, x, y)


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for r, ls in zip(results, ["-", "--", ":"]):
        a.plot(r["losses"], ls, label=r["label"], lw=1.5)
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.set_title("loss (same init, same batches)")
    a.legend()
    mb = [r["peak_bytes"] / 2**20 for r in results]
    bars = b.bar([r["label"].replace("(", "\n(", 1).replace("[", "\n[", 1) for r in results], mb, color=["C0", "C1", "C2"][: len(results)])
    for bar, r in zip(bars, results):
        b.annotate(f"{r['peak_bytes'] / 2**20:.0f} MB\n{r['tokens_per_s']:.0f} tok/s",
                   (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    b.set_ylabel("peak MB during one training step")
    b.set_ylim(0, max(mb) * 1.25)
    b.tick_params(axis="x", labelsize=8)
    b.set_title("memory")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: a larger preset, bf16 autocast)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary = model vocabulary")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--out", default="train_lm.png", help="where to write the PNG")
    ap.add_argument("--tiny", action="store_true", help="tiny model, vocab 512, few steps (tests)")
    ap.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager"],
                    help="compiler behind both compiled variants (aot_eager: fast, for tests)")
    ap.add_argument("--variants", default="eager,compile,cce")
    ap.add_argument("--cache-dir", default=str(_data.DEFAULT_CACHE), help="tokenizer/token cache (or $CCE_CACHE_DIR)")
    ap.add_argument("--no-explain", action="store_true")
    return ap.parse_args(argv)


LABELS = {"eager": "eager", "compile": "torch.compile", "cce": 'torch.compile(backend="cce")'}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    p = dict(PRESETS["tiny" if args.tiny else ("cuda" if device.type == "cuda" else "cpu")])
    for k, v in (("steps", args.steps), ("vocab", args.vocab_size), ("batch", args.batch), ("seq", args.seq)):
        if v is not None:
            p[k] = v
    if p["steps"] < 3:
        raise SystemExit("--steps must be >= 3 (step 0 compiles, step 1 is profiled for memory)")
    autocast = torch.bfloat16 if device.type == "cuda" else None
    labels = dict(LABELS)
    if args.inner != "inductor":
        labels.update(compile=f"torch.compile[{args.inner}]", cce=f"cce[{args.inner}]")

    tokens = _data.get_tokens(p["vocab"], p["corpus_bytes"], args.cache_dir)
    cfg = GPTConfig(vocab_size=p["vocab"], seq_len=p["seq"], d_model=p["d_model"], n_layer=p["n_layer"],
                    n_head=p["n_head"])
    batches = _data.make_batches(tokens, p["steps"], p["batch"], p["seq"], seed=0)
    N = p["batch"] * p["seq"]
    nparam = sum(t.numel() for t in make_model(cfg, "cpu").parameters())
    print(f"model: d_model={cfg.d_model} layers={cfg.n_layer} heads={cfg.n_head} vocab={cfg.vocab_size} "
          f"params={nparam / 1e6:.1f}M | batch {p['batch']} x seq {p['seq']} = {N} tokens/step, {p['steps']} steps, "
          f"{device.type}{' bf16 autocast' if autocast else ' fp32'} | data: {tokens.numel():,} tokens of stdlib source")
    print(f"fp32 logits of one step: N x V x 4 B = {N * cfg.vocab_size * 4 / 2**20:.0f} MB")

    report = None
    if not args.no_explain and "cce" in args.variants:
        report = rewrite_report(cfg, batches[0], device)
        print(report)

    results = []
    for v in args.variants.split(","):
        r = train(v, cfg, batches, p["lr"], device, inner=args.inner, autocast=autocast, desc=labels[v])
        r["label"] = labels[v]
        results.append(r)
        print(f"  {r['label']:30s} done: first step (incl. compile) {r['first_step_s']:.1f}s, "
              f"final loss {r['losses'][-1]:.4f}", flush=True)

    what = ("torch.cuda.max_memory_allocated during one step, minus what was allocated before it"
            if device.type == "cuda" else
            "peak of torch's CPU allocator during one step (torch.profiler allocation events), above its start")
    print(f"\npeak MB = {what}: forward + backward + optimizer step, excluding weights/optimizer state")
    print("tokens/s excludes step 0 (compilation) and the profiled step\n")
    head = f"{'variant':30s} {'peak MB':>9s} {'tokens/s':>10s} {'1st step s':>11s} {'final loss':>11s} {'cce op calls':>13s}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['label']:30s} {r['peak_bytes'] / 2**20:9.1f} {r['tokens_per_s']:10.0f} {r['first_step_s']:11.1f} "
              f"{r['losses'][-1]:11.4f} {r['cce_calls']:13d}")
    title = (f"GPT d{cfg.d_model} L{cfg.n_layer} V{cfg.vocab_size}, {N} tokens/step, {device.type}"
             f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}")
    plot(results, args.out, title)
    print(f"\nwrote {args.out}")
    return dict(results=results, report=report, preset=p,
                rewrites=None if report is None else len(report.rewrites))


if __name__ == "__main__":
    main()
