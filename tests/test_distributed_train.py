"""Training steps on 2 gloo processes: DDP, FSDP2 and tensor parallel (vocabulary-parallel lm-head) with
``torch.compile(backend="cce")`` — the loss and every gradient equal one-process training (float64), and
the ``cce::`` op actually ran (counted with the profiler on a step after the compiling one)."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from _dist_util import WorkerPool

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

V, D, T = 29, 8, 10  # V is odd: the vocabulary shards are uneven (15 + 14)
TOL = dict(rtol=1e-9, atol=1e-12)


def _tol(dtype):
    """float64 on the CPU: tight; float32 (the GPU runs: Triton kernels, NCCL sums in another order): loose."""
    return TOL if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)


@pytest.fixture(scope="module")
def workers():
    with WorkerPool(2) as pool:
        yield pool


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.layers = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(D)

    def forward(self, ids):
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class HFShapeLM(nn.Module):
    """Hugging Face's layout: the layer loop lives in an inner module, lm-head and loss in the outer forward
    (labels shifted as HF does)."""

    def __init__(self, bias=False, epilogue=None):
        super().__init__()
        self.model = Inner()
        self.lm_head = nn.Linear(D, V, bias=bias)
        self.epilogue = epilogue

    def forward(self, ids, labels=None):
        logits = self.lm_head(self.model(ids))
        if self.epilogue == "scale":
            logits = logits * 0.5
        elif self.epilogue == "softcap":
            logits = 3.0 * torch.tanh(logits / 3.0)
        if labels is None:
            return logits
        labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        return F.cross_entropy(logits.view(-1, V), labels.reshape(-1), ignore_index=-100)


class FlatLM(nn.Module):
    """nanoGPT's layout: the layer loop, the lm-head and the loss in one forward. ``use_op``: the one-line
    change that calls the op directly."""

    def __init__(self, use_op=False):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(D, V, bias=False)
        self.use_op = use_op

    def forward(self, ids, labels):
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h)
        if self.use_op:
            import cce_inductor

            return cce_inductor.linear_cross_entropy(h, self.lm_head.weight, labels)
        return F.cross_entropy(self.lm_head(h).view(-1, V), labels.reshape(-1))


def _batches(world, seed=1, rows=2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (world * rows, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    ids, labels = ids.to(device), labels.to(device)
    return [(ids[r * rows:(r + 1) * rows], labels[r * rows:(r + 1) * rows]) for r in range(world)]


def _loss_ops(counts) -> int:
    """Single-device cce loss ops a step ran: the fast path's one op (its backward only scales), or the
    low-memory path's forward and backward ops (counted once)."""
    fast = counts["cce::fast_linear_cross_entropy"]
    fwd, bwd = counts["cce::linear_cross_entropy_forward"], counts["cce::linear_cross_entropy_backward"]
    return fast + (fwd if fwd == bwd else -100)


def _cce_op_counts(step) -> collections.Counter:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return collections.Counter(e.name for e in prof.events() if e.name.startswith("cce::"))


def _full(g):
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def _data_parallel_reference(ref, batches):
    """One process: the mean over ranks of each rank's loss (what DDP / FSDP average the gradients of)."""
    losses = [ref(ids, labels) for ids, labels in batches]
    (sum(losses) / len(losses)).backward()
    return losses


def _check_grads(model, ref, failures, tag, tol=TOL, reduce_group=None):
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.grad is None:
            failures.append(f"{tag}: {name} has no gradient")
            continue
        g = _full(p.grad)
        if reduce_group is not None:
            g = g.clone()
            dist.all_reduce(g, group=reduce_group)
        if not torch.allclose(g, q.grad, **tol):
            failures.append(f"{tag}: d {name} differs by {(g - q.grad).abs().max().item():.3g}")


def _ddp_worker(rank, world, device="cpu", dtype=torch.float64, inner="aot_eager"):
    from cce_inductor.backend import make_backend

    failures = []
    old = torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
    torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = 64  # DDPOptimizer: tiny buckets force graph splits
    try:
        torch.manual_seed(0)
        model = HFShapeLM().to(device, dtype)
        ref = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=256 / 2**20,
                                                  device_ids=[rank] if device == "cuda" else None)
        batches = _batches(world, device=device)
        ids, labels = batches[rank]
        results = []
        compiled = torch.compile(ddp, backend=make_backend(inner, on_result=results.append))
        loss = compiled(ids, labels)
        loss.backward()
        ref_losses = _data_parallel_reference(ref, batches)
        if not torch.allclose(loss, ref_losses[rank], **_tol(dtype)):
            failures.append(f"loss {loss.item()} vs {ref_losses[rank].item()}")
        _check_grads(model, ref, failures, "ddp", tol=_tol(dtype))
        if len(results) < 2:
            failures.append(f"DDPOptimizer did not split the graph ({len(results)} graph): the test checks less")
        if sum(len(r.rewrites) for r in results) != 1:
            failures.append(f"rewrites: {[(r.rewrites, r.misses) for r in results]}")
        counts = _cce_op_counts(lambda: compiled(ids, labels).backward())
        if _loss_ops(counts) != 1:
            failures.append(f"cce ops in a step: {dict(counts)}")
    finally:
        torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = old
    return failures


@pytest.mark.slow
def test_ddp_two_processes(workers):
    for failures in workers.run(_ddp_worker, timeout=180):
        assert not failures, "\n".join(failures)


def _fsdp_worker(rank, world, variant, device="cpu", dtype=torch.float64, inner="aot_eager"):
    """variant: "whole" (fully_shard each layer and the root, torch.compile(model)), "regional" (each layer
    compiled on its own first, then the root), "flat" (the loop in the root's forward: nothing to rewrite),
    "flat+op" (the same model calling cce_inductor.linear_cross_entropy in its forward: eager)."""
    from torch.distributed.fsdp import fully_shard

    from cce_inductor.backend import make_backend

    failures = []
    torch.manual_seed(0)
    model = (FlatLM(use_op=variant == "flat+op") if variant.startswith("flat") else HFShapeLM(bias=True))
    model = model.to(device, dtype)
    ref = copy.deepcopy(model)
    layers = model.layers if variant.startswith("flat") else model.model.layers
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    results = []
    backend = make_backend(inner, on_result=results.append)
    if variant == "regional":
        for layer in layers:
            layer.compile(backend=backend)
    compiled = torch.compile(model, backend=backend) if variant != "flat+op" else model
    batches = _batches(world, device=device)
    ids, labels = batches[rank]
    loss = compiled(ids, labels)
    loss.backward()
    ref_losses = _data_parallel_reference(ref, batches)
    if not torch.allclose(loss, ref_losses[rank], **_tol(dtype)):
        failures.append(f"{variant}: loss {loss.item()} vs {ref_losses[rank].item()}")
    _check_grads(model, ref, failures, variant, tol=_tol(dtype))
    rewrites = sum(len(r.rewrites) for r in results)
    want = {"whole": 1, "regional": 1, "flat": 0, "flat+op": 0}[variant]
    if rewrites != want:
        failures.append(f"{variant}: {rewrites} rewrites, expected {want}: {[(r.rewrites, r.misses) for r in results]}")
    counts = _cce_op_counts(lambda: compiled(ids, labels).backward())
    ran = _loss_ops(counts)
    if ran != (0 if variant == "flat" else 1):
        failures.append(f"{variant}: cce ops in a step: {dict(counts)}")
    if variant == "flat":  # explain says why nothing was rewritten: the frame with the loss ran eagerly
        import cce_inductor

        report = cce_inductor.explain(model, ids, labels)
        if not any("forward" in n and "inside a for/while loop" in n and "FSDP2" in n for n in report.notes):
            failures.append(f"explain does not say why: {report}")
    return failures


@pytest.mark.parametrize("variant", [pytest.param("whole", marks=pytest.mark.slow), "regional", "flat", "flat+op"])
def test_fsdp2_two_processes(workers, variant):
    for failures in workers.run(_fsdp_worker, variant, timeout=180):
        assert not failures, "\n".join(failures)


def _tp_worker(rank, world, variant, inner, device="cpu", dtype=torch.float64):
    """torchtitan's recipe: lm_head ColwiseParallel(output_layouts=Shard(-1), use_local_output=False), the
    loss under loss_parallel() (entered outside the compiled code, around forward and backward).
    variant: (bias, epilogue, layout) with layout "loss_parallel", "seq_parallel" (the same with the lm-head
    input sequence-sharded: input_layouts=Shard(1)) or "gathered" (ColwiseParallel's default output: the
    logits all-gathered to Replicate and handed on as a plain tensor, a plain F.cross_entropy)."""
    import contextlib

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    from cce_inductor.backend import make_backend

    bias, epilogue, layout = variant
    seq_parallel = layout == "seq_parallel"
    failures = []
    mesh = init_device_mesh(device, (world,))
    tol = _tol(dtype)
    torch.manual_seed(0)
    model = HFShapeLM(bias=bias, epilogue=epilogue).to(device, dtype)
    ref = copy.deepcopy(model)
    if layout == "gathered":
        plan = ColwiseParallel(output_layouts=Replicate())
        ctx = contextlib.nullcontext
    else:
        plan = ColwiseParallel(input_layouts=Shard(1) if seq_parallel else Replicate(), output_layouts=Shard(-1),
                               use_local_output=False)
        ctx = loss_parallel
    parallelize_module(model, mesh, {"lm_head": plan})
    ids, labels = _batches(1, device=device)[0]  # the same batch on every rank (tensor parallel)
    if seq_parallel:  # each rank runs the trunk on its half of the sequence; the lm-head all-gathers it
        half = T // world
        my_ids = ids[:, rank * half:(rank + 1) * half]
    else:
        my_ids = ids
    if inner == "inductor":  # keep Inductor's C++ compile to the lm-head + loss (CI time on 2 cores)
        model.model.forward = torch.compiler.disable(model.model.forward)
    results, traced = [], []

    def checking(gm, example_inputs):  # the emitted call must have run on Dynamo's fake DTensors
        traced.extend(n.meta.get("example_value") is not None for n in gm.graph.nodes
                      if getattr(n.target, "__name__", "") == "rewrite_call")
        return torch._dynamo.lookup_backend(inner)(gm, example_inputs)
    compiled = torch.compile(model, backend=make_backend(checking, on_result=results.append))
    with ctx():
        loss = compiled(my_ids, labels)
        loss.backward()
    if isinstance(loss, DTensor) != (layout != "gathered"):
        failures.append(f"{variant}: the loss is a {type(loss).__name__}, not what eager returns")
        return failures
    want = ref(ids, labels)
    want.backward()
    got = _full(loss)
    if not torch.allclose(got, want, **tol):
        failures.append(f"{variant}: loss {got.item()} vs {want.item()}")
    if seq_parallel:  # the trunk is replicated, not synchronised: each rank holds its half's gradient
        trunk = [(n, p) for n, p in model.named_parameters() if not n.startswith("lm_head")]
        ref_trunk = [(n, p) for n, p in ref.named_parameters() if not n.startswith("lm_head")]
        for (name, p), (_, q) in zip(trunk, ref_trunk):
            g = p.grad.clone()
            dist.all_reduce(g)
            if not torch.allclose(g, q.grad, **tol):
                failures.append(f"{variant}: d {name} (summed over ranks) differs by {(g - q.grad).abs().max():.3g}")
        for name in ("weight", "bias") if bias else ("weight",):
            g, q = getattr(model.lm_head, name).grad, getattr(ref.lm_head, name).grad
            if not torch.allclose(g.full_tensor(), q, **tol):
                failures.append(f"{variant}: d lm_head.{name} differs")
    else:
        _check_grads(model, ref, failures, str(variant), tol=tol)
    if traced != [True]:
        failures.append(f"{variant}: emitted calls with a fake value: {traced}")
    rewrites = [r for res in results for r in res.rewrites]
    if len(rewrites) != 1 or not any("vocabulary-parallel" in n for n in rewrites[0].notes):
        failures.append(f"{variant}: rewrites {rewrites}, misses {[m for res in results for m in res.misses]}")

    def step():
        with ctx():
            compiled(my_ids, labels).backward()
    counts = _cce_op_counts(step)
    if counts["cce::vocab_parallel_forward"] != 1 or counts["cce::vocab_parallel_backward"] != 1:
        failures.append(f"{variant}: cce ops in a step: {dict(counts)}")
    return failures


@pytest.mark.parametrize("variant,inner", [
    ((False, None, "loss_parallel"), "aot_eager"),
    ((True, "softcap", "loss_parallel"), "aot_eager"),
    ((True, "scale", "seq_parallel"), "aot_eager"),
    ((True, "softcap", "gathered"), "aot_eager"),
    pytest.param((True, None, "loss_parallel"), "inductor", marks=pytest.mark.slow),
])
def test_tensor_parallel_loss_parallel_is_rewritten(workers, variant, inner):
    for failures in workers.run(_tp_worker, variant, inner, timeout=240):
        assert not failures, "\n".join(failures)


def _tp_miss_worker(rank, world):
    """A lm-head sharded on D (RowwiseParallel: weight Shard(1), logits Replicate) is left alone with the
    reason, and still computes what eager computes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    from cce_inductor.backend import make_backend

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = HFShapeLM().double()
    ref = copy.deepcopy(model)
    parallelize_module(model, mesh, {"lm_head": RowwiseParallel(input_layouts=Shard(-1))})
    model.model.norm.register_forward_hook(lambda m, i, o: o.tensor_split(world, -1)[rank])  # hand it its D-slice
    ids, labels = _batches(1)[0]
    results = []
    loss = torch.compile(model, backend=make_backend("aot_eager", on_result=results.append))(ids, labels)
    misses = [m.reason for r in results for m in r.misses]
    rewrites = [r for res in results for r in res.rewrites]
    return float(loss), float(ref(ids, labels)), misses, len(rewrites)


def test_row_parallel_lm_head_is_left_alone_with_a_reason(workers):
    for loss, want, misses, n_rewrites in workers.run(_tp_miss_worker, timeout=180):
        assert n_rewrites == 0
        assert abs(loss - want) < 1e-9
        assert any("Shard(dim=1)" in m and "only vocabulary sharding" in m for m in misses), misses


class WritesLocalWeightLM(HFShapeLM):
    """Writes the lm-head weight's local shard between the lm-head and the loss (what an in-loop weight
    update could do): eager's logits were computed before the write, a fused op would read after it."""

    def forward(self, ids, labels=None):
        logits = self.lm_head(self.model(ids))
        with torch.no_grad():
            self.lm_head.weight.to_local().mul_(0.5)
        return F.cross_entropy(logits.view(-1, V), labels.reshape(-1), ignore_index=-100)


def _tp_write_worker(rank, world):
    """A write to a DTensor's local tensor is a write to the DTensor: the loss is left alone, with the
    reason, and computes what eager computes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    from cce_inductor.backend import make_backend

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = WritesLocalWeightLM().double()
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})
    eager_model = copy.deepcopy(model)
    ids, labels = _batches(1)[0]
    results = []
    with loss_parallel():
        loss = torch.compile(model, backend=make_backend("aot_eager", on_result=results.append))(ids, labels)
        want = eager_model(ids, labels)
    misses = [m.reason for r in results for m in r.misses]
    rewrites = [r for res in results for r in res.rewrites]
    return float(_full(loss)), float(_full(want)), misses, len(rewrites)


def test_write_to_a_local_shard_is_left_alone(workers):
    for loss, want, misses, n_rewrites in workers.run(_tp_write_worker, timeout=180):
        assert n_rewrites == 0, misses
        assert abs(loss - want) < 1e-9
        assert any("writes to the weight" in m for m in misses), misses


def _backward_changing_worker(rank, world):
    """DTensor calls between the lm-head and the loss whose arguments change only the backward
    (``redistribute(backward_dtype=...)`` rounds the gradient, ``to_local(grad_placements=...)`` changes
    its reduction): left alone, and the gradients are eager's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from helpers import compile_counting

    mesh = init_device_mesh("cpu", (world,))

    def head():
        torch.manual_seed(0)
        m = nn.Linear(D, V, bias=False).double()
        parallelize_module(m, mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
        return m

    def grad_placements(m, h, y):
        z = m(h).redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
        return F.cross_entropy(z.reshape(-1, V), y.reshape(-1))

    def backward_dtype(m, h, y):
        z = m(h).redistribute(placements=[Replicate()], backward_dtype=torch.bfloat16).to_local()
        return F.cross_entropy(z.reshape(-1, V), y.reshape(-1))
    torch.manual_seed(1)
    h0, y = torch.randn(2, 3, D, dtype=torch.float64), torch.randint(0, V, (2, 3))
    out = {}
    for fn in (grad_placements, backward_dtype):
        torch._dynamo.reset()
        got = []
        for run in ("compiled", "eager"):
            m, h = head(), h0.clone().requires_grad_()
            compiled, results = compile_counting(fn, fullgraph=False)
            loss = (compiled if run == "compiled" else fn)(m, h, y)
            loss.backward()
            got.append((float(loss), h.grad.clone(), m.weight.grad.full_tensor()))
            if run == "compiled":
                out[fn.__name__] = [sum(len(r.rewrites) for r in results)]
        (lc, hc, wc), (le, he, we) = got
        out[fn.__name__] += [abs(lc - le), float((hc - he).abs().max()), float((wc - we).abs().max())]
    return out


def test_dtensor_calls_that_change_the_backward_are_left_alone(workers):
    for out in workers.run(_backward_changing_worker, timeout=180):
        for name, (rewrites, d_loss, d_h, d_w) in out.items():
            assert rewrites == 0, name
            assert d_loss < 1e-12 and d_h < 1e-12 and d_w < 1e-12, (name, d_loss, d_h, d_w)


def _hf_worker(rank, world, mode):
    """A tiny Hugging Face Llama: FSDP2 (each decoder layer and the root sharded; the loss left to Inductor, the
    logits being returned by the head's graph) or tensor parallel (ColwiseParallel lm_head + loss_parallel,
    rewritten), ``model(input_ids, labels=labels).loss`` compiled."""
    import transformers as T

    from cce_inductor.backend import make_backend

    cfg = T.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).double()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (2 * world, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    failures = []
    results = []
    backend = make_backend("aot_eager", on_result=results.append)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        mine = slice(2 * rank, 2 * rank + 2)
        compiled = torch.compile(model, backend=backend)
        loss = compiled(input_ids=ids[mine], labels=labels[mine]).loss
        loss.backward()
        ref_losses = [ref(input_ids=ids[2 * r:2 * r + 2], labels=labels[2 * r:2 * r + 2]).loss for r in range(world)]
        (sum(ref_losses) / world).backward()
        want, got = ref_losses[rank], loss
        op = "loss"

        def step():
            compiled(input_ids=ids[mine], labels=labels[mine]).loss.backward()
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

        mesh = init_device_mesh("cpu", (world,))
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Shard(-1),
                                                                    use_local_output=False)})
        # Compiling the model itself returns the DTensor logits too, and a backward from the loss alone then
        # fails inside AOTAutograd ("Expected a DTensor tangent but got a plain Tensor"), with or without
        # the rewrite: compile the loss function.
        compiled = torch.compile(lambda input_ids, labels: model(input_ids=input_ids, labels=labels).loss,
                                 backend=backend)
        with loss_parallel():
            loss = compiled(ids, labels)
            loss.backward()
        got = loss.full_tensor()
        want = ref(input_ids=ids, labels=labels).loss
        want.backward()
        op = "cce::vocab_parallel_forward"

        def step():
            with loss_parallel():
                compiled(ids, labels).backward()
    tol = dict(rtol=1e-5, atol=1e-7)  # HF upcasts the logits to float32 before the loss
    if not torch.allclose(got, want, **tol):
        failures.append(f"{mode}: loss {got.item()} vs {want.item()}")
    _check_grads(model, ref, failures, mode, tol=tol)
    # FSDP2: each sharded module call is a graph break, so the head + loss run in the graph that resumes inside
    # LlamaForCausalLM.forward, which returns the logits too: they are formed anyway, and the loss is left to
    # Inductor (the op would compute them a second time). Values are the same either way.
    fused = mode != "fsdp2"
    kept = [m for r in results for m in r.misses if m.category == "logits_kept"]
    if sum(len(r.rewrites) for r in results) != int(fused) or (not fused and len(kept) != 1):
        failures.append(f"{mode}: {[(r.rewrites, r.misses) for r in results]}")
    counts = _cce_op_counts(step)
    if (_loss_ops(counts) if op == "loss" else counts[op]) != int(fused):
        failures.append(f"{mode}: cce ops in a step: {dict(counts)}")
    return failures, [rw.notes for r in results for rw in r.rewrites]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp2", "tp"])
def test_hf_llama(workers, mode):
    pytest.importorskip("transformers")
    for failures, notes in workers.run(_hf_worker, mode, timeout=240):
        assert not failures, "\n".join(failures)
        if mode == "tp":
            assert any("vocabulary-parallel" in n for ns in notes for n in ns), notes


@pytest.fixture(scope="module")
def gpu_workers():
    with WorkerPool(2, backend="nccl") as pool:
        yield pool


_two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2 or
                               not dist.is_nccl_available(), reason="needs 2 CUDA GPUs and NCCL")


@pytest.mark.cuda
@_two_gpus
@pytest.mark.parametrize("variant", [(True, "softcap", "loss_parallel"), (False, None, "seq_parallel"),
                                     (False, None, "gathered")])
def test_nccl_tensor_parallel(gpu_workers, variant):
    """The vocabulary-parallel rewrite on 2 GPUs (NCCL, Inductor, float32): equal to one-GPU training."""
    for failures in gpu_workers.run(_tp_worker, variant, "inductor", "cuda", torch.float32, timeout=300):
        assert not failures, "\n".join(failures)


@pytest.mark.cuda
@_two_gpus
def test_nccl_fsdp2_and_ddp(gpu_workers):
    """FSDP2 (whole model compiled) and DDP on 2 GPUs: the single-GPU op (Triton kernels) runs, exact."""
    for failures in gpu_workers.run(_fsdp_worker, "whole", "cuda", torch.float32, "inductor", timeout=300):
        assert not failures, "\n".join(failures)
    for failures in gpu_workers.run(_ddp_worker, "cuda", torch.float32, "inductor", timeout=300):
        assert not failures, "\n".join(failures)
