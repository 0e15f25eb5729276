"""A GRPO step three ways — eager, torch.compile (Inductor), torch.compile(backend="cce") — with the per-token
log-probabilities and the entropy written the way RL trainers write them, from the logits.

A policy and a frozen reference model (Hugging Face Llama built from a config: no download) score rollouts
sampled from the policy: groups of completions per prompt, a toy verifiable reward (the share of even token
ids), group-normalised advantages. The loss is GRPO's: the clipped ratio ``exp(logp - old_logp)``, a k3 KL to
the reference, an entropy bonus, masked to each completion's length. The code reads the logits as trainers do —
``gather(z, -1, ids) - logsumexp(z)`` one row at a time (TRL's and verl's selective log-softmax), verl's
entropy ``logsumexp(z) - (softmax(z) * z).sum(-1)``, a sampling temperature ``z / T`` — and ``backend="cce"``
serves all of it with one op call per model that never forms the N x V logits: the policy's log-probabilities
and entropy with exact per-token gradients, and the old-policy and reference scoring under ``no_grad`` as a
forward only. The compiled variants check their losses against eager's at every step.

    python examples/grpo_step.py                       # CPU: a small Llama, Inductor, a few minutes
    python examples/grpo_step.py --tiny --inner aot_eager   # seconds; what the tests run
    python examples/grpo_step.py --device cuda --shape qwen2.5-0.5b --tokens 16384,32768,65536
        # GPU: one GRPO step at the model's width and vocabulary (--layers of them), time and peak memory
        # of eager, torch.compile and backend="cce" per rollout size, as a table (--dry-run: that code on
        # the CPU at a tiny size)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _data  # noqa: E402  (profile_step: peak memory and cce op calls of one step)

# --------------------------------------------------------------------------------------- the RL code

TEMPERATURE = 0.9


def completion_logits(model, ids, n_prompt):
    """The logits that predict the completion tokens, at the sampling temperature."""
    logits = model(input_ids=ids, use_cache=False).logits
    return logits[:, n_prompt - 1:-1] / TEMPERATURE


def selected_log_probs(logits, ids):
    """log softmax(logits)[ids]: the target's logit minus each row's logsumexp, one sequence at a time (as
    trainers write it to keep the peak low)."""
    picked = torch.gather(logits, -1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])


def entropy_of(logits):
    """The entropy of softmax(logits) per token, verl's way: logsumexp minus the softmax-weighted mean logit."""
    return torch.logsumexp(logits, dim=-1) - torch.sum(F.softmax(logits, dim=-1) * logits, dim=-1)


def score(model, ids, n_prompt):
    """Per-token log-probabilities of the completions (the old policy, the reference model): no gradient."""
    with torch.no_grad():
        return selected_log_probs(completion_logits(model, ids, n_prompt).float(), ids[:, n_prompt:])


def grpo_loss(model, ids, n_prompt, old_logp, ref_logp, advantages, mask, clip=0.2, beta=0.04, ent_coef=0.01):
    logits = completion_logits(model, ids, n_prompt).float()
    logp = selected_log_probs(logits, ids[:, n_prompt:])
    entropy = entropy_of(logits)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    policy = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    per_token = policy + beta * kl - ent_coef * entropy
    per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    return per_sequence.mean()


# ------------------------------------------------------------------------------------ models, rollouts

SHAPES = {  # (architecture, hidden, intermediate, heads, kv heads, vocab); layers set by --layers
    "qwen2.5-0.5b": ("Qwen2", 896, 4864, 14, 2, 151936),
    "llama3.2-1b": ("Llama", 2048, 8192, 32, 8, 128256),
    "cpu": ("Llama", 64, 256, 4, 2, 32000),
    "tiny": ("Llama", 32, 64, 2, 1, 512),
}


def make_model(shape: str, layers: int, seed: int, device, dtype):
    """A Hugging Face causal LM of the named shape, random weights (tied embeddings, as both models have)."""
    import transformers as T

    arch, hidden, inter, heads, kv, vocab = SHAPES[shape]
    cfg = getattr(T, f"{arch}Config")(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1 << 17,
        tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return getattr(T, f"{arch}ForCausalLM")(cfg).to(device=device, dtype=dtype)


def sample_rollouts(policy, prompts, group, n_new, seed):
    """``group`` completions of ``n_new`` tokens per prompt, sampled from the policy at the temperature."""
    g = torch.Generator(device=prompts.device).manual_seed(seed)
    ids = prompts.repeat_interleave(group, dim=0)
    with torch.no_grad():
        for _ in range(n_new):
            last = policy(input_ids=ids, use_cache=False).logits[:, -1].float() / TEMPERATURE
            ids = torch.cat([ids, torch.multinomial(F.softmax(last, -1), 1, generator=g)], dim=1)
    return ids


def rewards_and_advantages(ids, n_prompt, group, lengths):
    """A toy verifiable reward (the share of even token ids in the completion), normalised within each group."""
    completion = ids[:, n_prompt:]
    mask = (torch.arange(completion.shape[1], device=ids.device)[None, :] < lengths[:, None]).float()
    reward = ((completion % 2 == 0).float() * mask).sum(-1) / mask.sum(-1)
    r = reward.view(-1, group)
    adv = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-4)
    return reward, adv.reshape(-1), mask


def compile_fn(fn, variant, inner, results):
    if variant == "eager":
        return fn
    if variant == "compile":
        return torch.compile(fn, backend=inner)
    import cce_inductor

    return torch.compile(fn, backend=cce_inductor.make_backend(inner=inner, on_result=results.append))


# ------------------------------------------------------------------------------------------ CPU run

PRESETS = {
    "cpu": dict(shape="cpu", layers=2, prompts=2, group=4, prompt_len=16, new=48, steps=3, lr=1e-3),
    "tiny": dict(shape="tiny", layers=1, prompts=2, group=2, prompt_len=4, new=6, steps=3, lr=1e-3),
}


def train(variant, p, rollout, device, inner):
    """``p["steps"]`` GRPO iterations over one rollout batch (old log-probabilities from sampling time, as
    GRPO with several iterations per batch does), from the same initial weights."""
    torch._dynamo.reset()
    results = []
    policy = make_model(p["shape"], p["layers"], 0, device, torch.float32)
    reference = make_model(p["shape"], p["layers"], 0, device, torch.float32).requires_grad_(False)
    ids, n_prompt, adv, mask = rollout
    scorer = compile_fn(score, variant, inner, results)
    loss_fn = compile_fn(grpo_loss, variant, inner, results)
    opt = torch.optim.AdamW(policy.parameters(), lr=p["lr"])
    old_logp = scorer(policy, ids, n_prompt)
    scorer(reference, ids, n_prompt)  # (compiles for the second model: measured below without it)
    ref_logp, score_peak, score_calls = _data.profile_step(lambda: scorer(reference, ids, n_prompt), device)

    def step():
        loss = loss_fn(policy, ids, n_prompt, old_logp, ref_logp, adv, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    losses, times, peak, calls = [], [], 0, 0
    for i in range(p["steps"]):
        t0 = time.perf_counter()
        if i == 1:
            loss, peak, calls = _data.profile_step(step, device)
        else:
            loss = step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return dict(variant=variant, losses=losses, first_step_s=times[0], step_s=min(times[1:] or times),
                peak_bytes=peak, score_peak_bytes=score_peak, cce_calls=calls + score_calls,
                rewrites=[r for res in results for r in res.rewrites], misses=[m for res in results for m in res.misses],
                old_logp=old_logp, ref_logp=ref_logp)


LABELS = {"eager": "eager", "compile": "torch.compile", "cce": 'torch.compile(backend="cce")'}


def run_cpu(args):
    device = torch.device(args.device)
    p = dict(PRESETS["tiny" if args.tiny else "cpu"])
    for k in ("steps", "layers"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    if p["steps"] < 2:
        raise SystemExit("--steps must be >= 2 (step 1 is profiled for memory)")
    labels = dict(LABELS)
    if args.inner != "inductor":
        labels.update(compile=f"torch.compile[{args.inner}]", cce=f"cce[{args.inner}]")
    policy = make_model(p["shape"], p["layers"], 0, device, torch.float32)
    vocab = SHAPES[p["shape"]][-1]
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, vocab, (p["prompts"], p["prompt_len"]), generator=g).to(device)
    ids = sample_rollouts(policy, prompts, p["group"], p["new"], seed=2)
    lengths = torch.randint(p["new"] // 2, p["new"] + 1, (ids.shape[0],), generator=g).to(device)
    reward, adv, mask = rewards_and_advantages(ids, p["prompt_len"], p["group"], lengths)
    rollout = (ids, p["prompt_len"], adv, mask)
    n_tok = ids.shape[0] * p["new"]
    print(f"policy/reference: {SHAPES[p['shape']][0]} {p['shape']} ({p['layers']} layers, vocab {vocab}) | {p['prompts']} prompts x "
          f"{p['group']} completions x {p['new']} tokens = {n_tok} scored tokens | mean reward {reward.mean():.3f}")
    print(f"float32 logits of one step: N x V x 4 B = {n_tok * vocab * 4 / 2**20:.1f} MB")

    report = None
    if not args.no_explain and "cce" in args.variants:
        import cce_inductor

        torch._dynamo.reset()
        ref_logp = score(policy, ids, p["prompt_len"])
        report = cce_inductor.explain(grpo_loss, policy, ids, p["prompt_len"], ref_logp, ref_logp, adv, mask)
        print(report)

    out = []
    for v in args.variants.split(","):
        r = train(v, p, rollout, device, args.inner)
        r["label"] = labels[v]
        out.append(r)
        print(f"  {r['label']:30s} losses {', '.join(f'{x:.6f}' for x in r['losses'])}", flush=True)
    base = out[0]
    for r in out[1:]:  # same weights, same rollouts: the same numbers
        torch.testing.assert_close(r["old_logp"], base["old_logp"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r["ref_logp"], base["ref_logp"], rtol=1e-4, atol=1e-4)
        for a, b in zip(r["losses"], base["losses"]):
            assert abs(a - b) <= 1e-4 * (1 + abs(b)), (r["variant"], r["losses"], base["losses"])
    print("\npeak MB: torch's CPU allocator during one GRPO step (policy forward + backward + AdamW), and during the "
          "reference model's no-grad scoring, above what was live before (torch.profiler allocation events)")
    head = (f"{'variant':30s} {'step peak MB':>13s} {'scoring peak MB':>16s} {'step s':>8s} {'1st step s':>11s} "
            f"{'final loss':>11s} {'cce op calls':>13s}")
    print(head)
    print("-" * len(head))
    for r in out:
        print(f"{r['label']:30s} {r['peak_bytes'] / 2**20:13.1f} {r['score_peak_bytes'] / 2**20:16.1f} "
              f"{r['step_s']:8.2f} {r['first_step_s']:11.1f} {r['losses'][-1]:11.6f} {r['cce_calls']:13d}")
    for r in out:
        if r["variant"] == "cce":
            print(f"\nrewrites made by backend=\"cce\": {len(r['rewrites'])}, misses {len(r['misses'])}")
            for rw in r["rewrites"]:
                print(f"  {rw.loss}: reads {rw.options.get('reads', rw.loss)}, N={rw.N} D={rw.D} V={rw.V}, "
                      f"path {rw.path}, logits kept: {rw.logits_kept}")
    return dict(results=out, report=report, preset=p)


# ------------------------------------------------------------------------------------------ GPU table

def run_cuda(args):
    """The table: one GRPO step (policy forward + backward) and the reference's no-grad scoring per rollout size
    and variant, median time and peak memory above what was live before. ``--dry-run``: the same code on the
    CPU at a tiny size (no timing or memory worth reading), to check the script without a GPU."""
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    shape = "tiny" if dry else args.shape
    tokens = [int(t) for t in (args.tokens if not dry else "16,32").split(",")]
    seq, prompt_len = (8, 4) if dry else (args.seq, args.prompt_len)
    layers = args.layers or (1 if dry else 4)
    arch, hidden, _, _, _, vocab = SHAPES[shape]
    name = "cpu (dry run)" if dry else torch.cuda.get_device_name(device)
    print(f"{shape} shape ({arch}): hidden {hidden}, vocab {vocab}, {layers} layers, bf16 weights, rollouts of "
          f"{seq} tokens (prompt {prompt_len}); one GRPO step = policy forward + backward (no optimizer), and "
          f"the reference model's no-grad scoring; {name}")
    rows = []
    for n_tok in tokens:
        n_seq = max(1, n_tok // seq)
        g = torch.Generator(device=device).manual_seed(0)
        ids = torch.randint(0, vocab, (n_seq, seq + prompt_len), device=device, generator=g)
        adv = torch.randn(n_seq, device=device, generator=g)
        mask = torch.ones(n_seq, seq, device=device)
        row = {"tokens": n_seq * seq}
        for variant in args.variants.split(","):
            row[variant] = _measure(variant, shape, layers, ids, prompt_len, adv, mask, device,
                                    "aot_eager" if dry else "inductor", iters=1 if dry else 5)
            print(f"  {n_seq * seq} tokens, {LABELS[variant]}: {_fmt(row[variant])}", flush=True)
        rows.append(row)
    variants = args.variants.split(",")
    print("\n| tokens | " + " | ".join(f"{LABELS[v]} step ms / peak GB" for v in variants) + " | "
          + " | ".join(f"{LABELS[v]} scoring ms / peak GB" for v in variants) + " |")
    print("|---" * (1 + 2 * len(variants)) + "|")
    for row in rows:
        step = [_fmt(row[v], "step") for v in variants]
        scoring = [_fmt(row[v], "score") for v in variants]
        print(f"| {row['tokens']} | " + " | ".join(step) + " | " + " | ".join(scoring) + " |")
    return rows


def _fmt(m, part=None):
    if "error" in m:
        return m["error"]
    if part is None:
        return (f"step {m['step_ms']:.1f} ms, peak {m['step_peak'] / 2**30:.2f} GB; scoring {m['score_ms']:.1f} ms, "
                f"peak {m['score_peak'] / 2**30:.2f} GB; rewrites {m['rewrites']}")
    return f"{m[part + '_ms']:.1f} / {m[part + '_peak'] / 2**30:.2f}"


def _measure(variant, shape, layers, ids, n_prompt, adv, mask, device, inner, iters):
    cuda = device.type == "cuda"
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    results = []
    policy = reference = None
    try:
        policy = make_model(shape, layers, 0, device, torch.bfloat16)
        reference = make_model(shape, layers, 1, device, torch.bfloat16).requires_grad_(False)
        scorer = compile_fn(score, variant, inner, results)
        loss_fn = compile_fn(grpo_loss, variant, inner, results)
        old_logp = scorer(policy, ids, n_prompt)

        def scoring():
            return scorer(reference, ids, n_prompt)

        def step():
            loss = loss_fn(policy, ids, n_prompt, old_logp, old_logp, adv, mask)
            loss.backward()
            for q in policy.parameters():
                q.grad = None
            return loss
        out = {}
        for name, fn in (("score", scoring), ("step", step)):
            fn()  # compile, warm up
            times, peak = [], 0
            for _ in range(iters):
                if cuda:
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                    peak = torch.cuda.max_memory_allocated() - base
                times.append((time.perf_counter() - t0) * 1e3)
            out[name + "_ms"], out[name + "_peak"] = statistics.median(times), peak
        out["rewrites"] = sum(len(r.rewrites) for r in results)
        return out
    except torch.cuda.OutOfMemoryError:
        return {"error": "OOM"}
    finally:
        policy = reference = None
        if cuda:
            torch.cuda.empty_cache()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (a small model, checked against eager) or cuda (the table)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and few tokens (tests)")
    ap.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager"],
                    help="compiler behind both compiled variants (aot_eager: fast, for tests)")
    ap.add_argument("--variants", default="eager,compile,cce")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (cuda default 4: the head dominates)")
    ap.add_argument("--no-explain", action="store_true")
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=["qwen2.5-0.5b", "llama3.2-1b"], help="cuda: model shape")
    ap.add_argument("--tokens", default="16384,32768,65536", help="cuda: scored tokens per step (rollouts x --seq)")
    ap.add_argument("--seq", type=int, default=2048, help="cuda: completion tokens per rollout")
    ap.add_argument("--prompt-len", type=int, default=256, help="cuda: prompt tokens per rollout")
    ap.add_argument("--dry-run", action="store_true", help="cuda: run the table's code on the CPU at a tiny size")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" or args.dry_run:
        return run_cuda(args)
    return run_cpu(args)


if __name__ == "__main__":
    main()
