"""Compile-time cost of the rewrite on the CPU: first call (compile + one fwd/bwd) with and without it.

    python benchmarks/compile_overhead.py [--inners aot_eager,inductor] [--layers 2]

A tiny HF Llama (built from a config, no download), compiled as
``lambda ids, labels: model(input_ids=ids, labels=labels).loss``. The FX graph cache is off, so both
variants compile from scratch. Prints the pass's own time and the whole first call for each inner
backend; ``--repeat`` runs each variant several times (median).
"""
import argparse
import statistics
import time

import torch

import cce_inductor


def first_call_seconds(model, ids, compile_backend):
    torch._dynamo.reset()
    fn = torch.compile(lambda i, l: model(input_ids=i, labels=l).loss, backend=compile_backend)
    t0 = time.perf_counter()
    fn(ids, ids).backward()
    return time.perf_counter() - t0


def timed_backend(inner, pass_seconds):
    """``make_backend(inner)``, appending to ``pass_seconds`` the time the rewrite took on each graph: from
    the backend's call to its ``on_result`` callback, which it makes as soon as the rewrite returns."""
    started = []

    def on_result(result):
        pass_seconds.append(time.perf_counter() - started[-1])

    cce = cce_inductor.make_backend(inner, on_result=on_result)

    def backend_fn(gm, example_inputs, **kwargs):
        started.append(time.perf_counter())
        return cce(gm, example_inputs, **kwargs)

    return backend_fn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--inners", default="aot_eager,inductor")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=a.layers,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    torch._inductor.config.fx_graph_cache = False

    rows = []
    for inner in a.inners.split(","):
        base = [first_call_seconds(model, ids, inner) for _ in range(a.repeat)]
        pass_seconds = []
        cce = [first_call_seconds(model, ids, timed_backend(inner, pass_seconds)) for _ in range(a.repeat)]
        rows.append((inner, statistics.median(base), statistics.median(cce), 1e3 * statistics.median(pass_seconds)))
    print(f"torch {torch.__version__}, HF Llama {a.layers} layers, V=32000, 2x64 tokens, CPU, median of {a.repeat}")
    print(f"{'inner':10} {'plain s':>8} {'with cce s':>10} {'diff s':>7} {'pass ms':>8}")
    for inner, b, c, p in rows:
        print(f"{inner:10} {b:8.2f} {c:10.2f} {c - b:7.2f} {p:8.1f}")


if __name__ == "__main__":
    main()
