"""DDP, FSDP2 and tensor parallel training of a Hugging Face Llama on 2 processes, with and without the rewrite.

    torchrun --nproc-per-node 2 benchmarks/distributed_bench.py                 # 2 GPUs, NCCL, bf16
    torchrun --nproc-per-node 2 benchmarks/distributed_bench.py --tiny --backend gloo   # CPU smoke run

The model is ``LlamaForCausalLM`` from a config with the Llama-3.2-1B shape (D = 2048, 32 heads, 8 KV heads,
MLP 8192, V = 128256; untied lm-head so tensor parallelism can shard it) but ``--layers`` decoder layers
(default 2: the lm-head + loss are what this measures), random init, bf16 parameters, AdamW. The data are
Zipf-distributed tokens (so the loss falls over the steps). Each step has ``--tokens`` tokens in total
(``--seq`` per sequence): data-parallel modes split them over the ranks, tensor parallel gives every rank
all of them. Runs, each a fresh model with the same init and the same batches:

  reference   one process, eager (the loss curve the others are compared with)
  ddp         DistributedDataParallel, torch.compile (Inductor) vs backend="cce"
  fsdp2       fully_shard on each decoder layer and on the root, torch.compile vs backend="cce"
  tp          lm-head ColwiseParallel(output_layouts=Shard(-1), use_local_output=False) + loss_parallel,
              the decoder layers with Hugging Face's TP plan (q/k/v/gate/up colwise, o/down rowwise);
              torch.compile vs backend="cce" (the vocabulary-parallel op)
  tp-loss     the loss head alone (N x D hidden, V/2 x D weight shard per rank): loss_parallel's
              F.cross_entropy on the DTensor logits vs cce_inductor.vocab_parallel_linear_cross_entropy

Every compiled run compiles ``lambda ids, labels: model(input_ids=ids, labels=labels).loss`` (through a
module wrapper) — compiling the model itself returns the logits too, which keeps them alive, and under
tensor parallelism fails in AOTAutograd's backward with DTensor logits. Per run: the loss of each step
(with its largest difference from the reference), per-GPU peak memory over the timed steps (after the
first, compiling, step; "above start": the peak minus what was allocated when the window opened:
parameters, optimizer state), the median step time, and the number of losses the rewrite replaced. The table
comes last; with ``$OUT`` set, ``$OUT/distributed_bench.json`` holds everything. Runs are skipped (and
marked so) when the ``--budget-s`` wall-clock budget would be exceeded.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import statistics
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

import cce_inductor  # noqa: E402
from cce_inductor.backend import make_backend  # noqa: E402
from harness import PeakMemory, fmt, gpu_name, versions, wall_s, write_json  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke run)")
    p.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 2; tiny 2)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step in total (default 8192; tiny 256)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    p.add_argument("--steps", type=int, default=6, help="training steps per run (the first one compiles)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", default=None, help="bfloat16 (default on GPU) or float32 (default with --tiny)")
    p.add_argument("--runs", default="reference,tp-loss,tp,fsdp2,ddp",
                   help="comma-separated subset of: reference, tp-loss, tp, fsdp2, ddp, single")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip runs that would end after this")
    p.add_argument("--collective-timeout-s", type=float, default=240.0,
                   help="process-group timeout: a rank left waiting by another's failure gives up after this")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------

def model_config(args):
    import transformers as T

    if args.tiny:
        return T.LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq,
                             tie_word_embeddings=False)
    return T.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=max(args.seq, 2048),
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


class LossOnly(nn.Module):
    """``model(input_ids, labels=labels).loss`` as a module's forward (only the loss leaves the compiled code)."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids, labels):
        return self.m(input_ids=ids, labels=labels).loss


def build_model(cfg, device, dtype):
    import transformers as T

    torch.manual_seed(0)
    with torch.device(device):
        model = T.LlamaForCausalLM(cfg)
    return model.to(dtype)


def batches(cfg, args, steps):
    """Zipf-distributed tokens (a fixed random permutation of the vocabulary ranks), the same on every rank."""
    g = torch.Generator().manual_seed(1234)
    v = cfg.vocab_size
    ranks = torch.arange(1, v + 1, dtype=torch.float64)
    probs = (1.0 / ranks) / (1.0 / ranks).sum()
    perm = torch.randperm(v, generator=g)
    n_seq = args.tokens // args.seq
    out = []
    for _ in range(steps):
        ids = perm[torch.multinomial(probs, n_seq * args.seq, replacement=True, generator=g)].view(n_seq, args.seq)
        out.append(ids)
    return out


def all_ranks_mean(x: float, group=None) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=group)
    return t.item() / dist.get_world_size(group)


def all_ranks_max(x, device):
    """Largest over ranks of a number or of each number in a (peak, above-start) pair; None stays None."""
    if isinstance(x, tuple):
        return tuple(all_ranks_max(v, device) for v in x)
    if x is None:
        return None
    t = torch.tensor([x], dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# ---------------------------------------------------------------------------------------------
# One training run
# ---------------------------------------------------------------------------------------------

def train(step_fn, params, data_for_step, args, device, foreach=True):
    """Run ``args.steps`` steps of ``loss = step_fn(ids, labels); loss.backward(); opt.step()``.
    ``foreach=False`` when the parameters mix DTensors and plain tensors (tensor parallel)."""
    opt = torch.optim.AdamW(params, lr=args.lr, foreach=foreach)
    mem = PeakMemory(device, empty_cache=True)  # over the steps after the first (compiling) one

    def one_step(ids, labels):
        loss = step_fn(ids, labels)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    losses, times = [], []
    for i in range(args.steps):
        ids, labels = data_for_step(i)
        if i == 1:
            mem.start()
        seconds, loss = wall_s(one_step, ids, labels, device=device)
        times.append(seconds)
        losses.append(float(loss))
    if args.steps > 1:
        mem.stop()
    timed = times[1:] if len(times) > 1 else times
    return losses, statistics.median(timed), times[0], (mem.peak_mib, mem.above_mib)


def run_reference(cfg, args, device, dtype, data):
    """One process, eager, the whole batch: the loss curve everything else is compared with."""
    model = build_model(cfg, device, dtype)
    wrapper = LossOnly(model)

    def step(ids, labels):
        loss = wrapper(ids, labels)
        loss.backward()
        return loss.detach()
    return train(step, model.parameters(), lambda i: (data[i].to(device), data[i].to(device)), args, device)


def compile_with(module, cce: bool):
    """``torch.compile(module)`` with Inductor, or with the rewrite in front of it; the list collects each
    graph's rewrite result."""
    results = []
    backend = make_backend("inductor", on_result=results.append) if cce else "inductor"
    return torch.compile(module, backend=backend), results


def n_rewrites(results):
    return sum(len(r.rewrites) for r in results)


def run_single(cfg, args, device, dtype, data, cce: bool):
    model = build_model(cfg, device, dtype)
    compiled, results = compile_with(LossOnly(model), cce)

    def step(ids, labels):
        loss = compiled(ids, labels)
        loss.backward()
        return loss.detach()
    out = train(step, model.parameters(), lambda i: (data[i].to(device), data[i].to(device)), args, device)
    return out, n_rewrites(results) if cce else 0


def train_data_parallel(module, params, args, device, data, cce: bool):
    """Compile ``module`` (DDP- or FSDP-wrapped) and train it on this rank's share of every batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    compiled, results = compile_with(module, cce)
    n = data[0].shape[0] // world

    def step(ids, labels):
        loss = compiled(ids, labels)
        loss.backward()
        return all_ranks_mean(loss.item())

    def local(i):
        x = data[i][rank * n:(rank + 1) * n].to(device)
        return x, x
    return train(step, params, local, args, device), n_rewrites(results)


def run_ddp(cfg, args, device, dtype, data, cce: bool):
    model = build_model(cfg, device, dtype)
    ddp = nn.parallel.DistributedDataParallel(LossOnly(model), device_ids=[device.index] if device.type == "cuda"
                                              else None)
    return train_data_parallel(ddp, model.parameters(), args, device, data, cce)


def run_fsdp2(cfg, args, device, dtype, data, cce: bool):
    from torch.distributed.fsdp import fully_shard

    model = build_model(cfg, device, dtype)
    wrapper = LossOnly(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(wrapper)
    return train_data_parallel(wrapper, wrapper.parameters(), args, device, data, cce)


def tp_plan(model):
    """Hugging Face's Llama TP plan for the decoder layers, and the loss-parallel lm-head."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {"lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[p + name] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[p + name] = RowwiseParallel()
    return plan


def run_tp(cfg, args, device, dtype, data, cce: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    model = build_model(cfg, device, dtype)
    parallelize_module(model, mesh, tp_plan(model))
    compiled, results = compile_with(LossOnly(model), cce)

    def step(ids, labels):
        with loss_parallel():
            loss = compiled(ids, labels)
            loss.backward()
        return loss.full_tensor().item() if hasattr(loss, "full_tensor") else loss.item()
    out = train(step, model.parameters(), lambda i: (data[i].to(device), data[i].to(device)), args, device,
                foreach=False)
    rewrites = [r for res in results for r in res.rewrites]
    return out, sum(1 for r in rewrites if any("vocabulary-parallel" in n for n in r.notes))


def run_tp_loss(cfg, args, device, dtype, reps=5):
    """The loss head alone: hidden [N, D] (replicated), weight shard [V/2, D] per rank, forward + backward."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    n, d, v = args.tokens, cfg.hidden_size, cfg.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    h_full = (torch.randn(n, d, generator=g) * 1.0).to(device, dtype)
    w_full = (torch.randn(v, d, generator=g) / d ** 0.5).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    out = {}
    for name in ("loss_parallel", "cce"):
        h = DTensor.from_local(h_full.clone(), mesh, (Replicate(),), run_check=False).requires_grad_()
        w = distribute_tensor(w_full, mesh, (Shard(0),)).detach().requires_grad_()
        def fwd_bwd():
            if name == "loss_parallel":
                with loss_parallel():
                    loss = F.cross_entropy((h @ w.T).float(), labels)  # what HF's loss does: upcast, then CE
                    loss.backward()
            else:
                loss = cce_inductor.linear_cross_entropy(h, w, labels)
                loss.backward()
            return loss

        times = []
        mem = PeakMemory(device, empty_cache=True)  # over the calls after the first
        for i in range(reps + 1):
            h.grad = w.grad = None
            if i == 1:
                mem.start()
            seconds, loss = wall_s(fwd_bwd, device=device)
            times.append(seconds)
        mem.stop()
        grads_bytes = (h.grad.to_local().numel() + w.grad.to_local().numel()) * h_full.element_size()
        out[name] = dict(loss=float(loss.detach().full_tensor()), time_s=statistics.median(times[1:]),
                         peak_mb=(mem.peak_mib, mem.above_mib),
                         grad_mb=grads_bytes / 2**20, dw=w.grad.full_tensor().float(), dh=h.grad.full_tensor().float())
    err_w = ((out["cce"]["dw"] - out["loss_parallel"]["dw"]).norm() / out["loss_parallel"]["dw"].norm()).item()
    err_h = ((out["cce"]["dh"] - out["loss_parallel"]["dh"]).norm() / out["loss_parallel"]["dh"].norm()).item()
    for k in out:
        out[k].pop("dw"), out[k].pop("dh")
    out["rel_diff_dW_dH"] = (err_w, err_h)
    return out


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def main():
    args = parse_args()
    use_cuda = torch.cuda.is_available() and (args.backend in (None, "nccl"))
    backend = args.backend or ("nccl" if use_cuda else "gloo")
    defaults = dict(layers=2, tokens=256, seq=64, dtype="float32") if args.tiny else \
        dict(layers=2, tokens=8192, seq=2048, dtype="bfloat16")
    for k, v in defaults.items():
        setattr(args, k, getattr(args, k) or v)
    dtype = getattr(torch, args.dtype)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", 1))))
    # A rank that fails inside a mode while the other waits in a collective would block it until the
    # process group's timeout: keep that short, so a failure ends the run instead of the device budget.
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.collective_timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.tokens % (args.seq * world):
        raise SystemExit(f"--tokens {args.tokens} must be a multiple of --seq x world = {args.seq * world}")
    cfg = model_config(args)
    data = batches(cfg, args, args.steps)
    t_start = time.perf_counter()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    plan = []
    for r in runs:
        if r in ("ddp", "fsdp2", "tp", "single"):
            plan += [(r, False), (r, True)]
        else:
            plan.append((r, None))
    rows, record, reference = [], {"args": vars(args), "world": world, "backend": backend,
                                   "torch": torch.__version__, "device": gpu_name(device),
                                   "versions": versions(("transformers", "triton"))}, None
    last_cost = 0.0
    for mode, cce in plan:
        name = mode if cce is None else f"{mode} {'cce' if cce else 'inductor'}"
        elapsed = time.perf_counter() - t_start
        if elapsed + last_cost > args.budget_s:
            rows.append(dict(run=name, skipped=f"time budget ({elapsed:.0f} s used)"))
            continue
        torch._dynamo.reset()
        gc.collect()  # the previous run's model and optimizer go before this one allocates
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dist.barrier()
        t0 = time.perf_counter()
        try:
            if mode == "reference":
                losses, step_s, first_s, peak = run_reference(cfg, args, device, dtype, data) if rank == 0 \
                    else ([math.nan] * args.steps, math.nan, math.nan, (None, None))
                reference = losses
                rows.append(dict(run=name, losses=losses, step_s=step_s, first_s=first_s, peak_mb=peak, rewrites=0))
            elif mode == "tp-loss":
                out = run_tp_loss(cfg, args, device, dtype)
                for k in ("loss_parallel", "cce"):
                    rows.append(dict(run=f"tp-loss {k}", losses=[out[k]["loss"]], step_s=out[k]["time_s"],
                                     first_s=None, peak_mb=all_ranks_max(out[k]["peak_mb"], device),
                                     grad_mb=out[k]["grad_mb"], rewrites=None))
                record["tp_loss_rel_diff_dW_dH"] = out["rel_diff_dW_dH"]
            else:
                fn = {"ddp": run_ddp, "fsdp2": run_fsdp2, "tp": run_tp, "single": run_single}[mode]
                if mode == "single" and rank != 0:
                    (losses, step_s, first_s, peak), n_rw = ([math.nan] * args.steps, math.nan, math.nan,
                                                             (None, None)), 0
                else:
                    (losses, step_s, first_s, peak), n_rw = fn(cfg, args, device, dtype, data, cce)
                rows.append(dict(run=name, losses=losses, step_s=step_s, first_s=first_s,
                                 peak_mb=all_ranks_max(peak, device) if mode != "single" else peak, rewrites=n_rw))
        except Exception as e:  # report and go on: one failing mode must not hide the others' numbers
            import traceback

            traceback.print_exc()
            rows.append(dict(run=name, error=f"{type(e).__name__}: {str(e)[:200]}"))
        dist.barrier()
        last_cost = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # the reference lives on rank 0: share it
    ref = [reference if rank == 0 else None]
    dist.broadcast_object_list(ref, src=0)
    reference = ref[0]
    for row in rows:
        if reference and row.get("losses") and len(row["losses"]) == len(reference) and not row["run"].startswith(
                "reference"):
            row["max_dloss"] = max(abs(a - b) for a, b in zip(row["losses"], reference))
    record["rows"] = rows
    record["total_s"] = time.perf_counter() - t_start
    if rank == 0:
        print_table(rows, args, record)
        if os.environ.get("OUT"):
            write_json(os.path.join(os.environ["OUT"], "distributed_bench.json"), record)
    dist.destroy_process_group()


def _fmt(x, spec):
    return fmt(x, spec, "-")


def print_table(rows, args, record):
    print(f"\ndistributed_bench: {record['world']} x {record['device']} ({record['backend']}), "
          f"torch {record['torch']}, {args.layers} layers, {args.tokens} tokens/step, {args.dtype}, {args.steps} steps, "
          f"{record['total_s']:.0f} s")
    if "tp_loss_rel_diff_dW_dH" in record:
        dw, dh = record["tp_loss_rel_diff_dW_dH"]
        print(f"tp-loss: relative difference of dW / dH between cce and loss_parallel: {dw:.2e} / {dh:.2e}")
    head = f"{'run':<22} {'peak MB/GPU':>12} {'above start':>11} {'step ms':>9} {'1st step s':>10} " \
           f"{'rewrites':>8} {'max |dloss|':>11}  losses"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "skipped" in r or "error" in r:
            print(f"{r['run']:<22} {r.get('skipped') or r.get('error')}")
            continue
        losses = " ".join(_fmt(x, ".4f") for x in r.get("losses", []))
        peak, above = r.get("peak_mb") or (None, None)
        print(f"{r['run']:<22} {_fmt(peak, '12.0f')} {_fmt(above, '11.0f')} {_fmt(r['step_s'] * 1e3, '9.1f')} "
              f"{_fmt(r.get('first_s'), '10.1f')} {_fmt(r.get('rewrites'), '8d')} {_fmt(r.get('max_dloss'), '11.2e')}"
              f"  {losses}")


if __name__ == "__main__":
    main()
