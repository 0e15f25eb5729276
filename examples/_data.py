"""Shared helpers for the examples: a real-text corpus that every machine already has (the Python
standard library's own ``.py`` sources), a byte-level BPE tokenizer trained on it locally with the
``tokenizers`` package, and a token stream cached on disk.

Nothing is downloaded. The tokenizer and the encoded token stream are cached under
``$CCE_CACHE_DIR`` (default ``~/.cache/cce_inductor``), keyed by vocabulary size and a fingerprint of the
corpus (a SHA-1 of the selected files' contents), so a second run starts at once.

Also :func:`profile_step`: the peak memory and the number of ``cce::`` op calls of one training step.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
import time
from pathlib import Path

import torch

DEFAULT_CACHE = Path(os.environ.get("CCE_CACHE_DIR", Path.home() / ".cache" / "cce_inductor"))
SPECIAL = "<|endoftext|>"


def stdlib_files() -> list[Path]:
    """Every ``.py`` file of the standard library (site-/dist-packages excluded), in a fixed order
    that mixes packages (sorted by a hash of the relative path, so any prefix is a diverse sample)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not ({"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts))]
    return sorted(files, key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())


def corpus(max_bytes: int) -> tuple[list[str], str]:
    """Up to ``max_bytes`` of standard-library source text, one string per file, and its fingerprint."""
    texts, total, h = [], 0, hashlib.sha1()
    for p in stdlib_files():
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if total + len(t) > max_bytes and texts:
            break
        texts.append(t)
        total += len(t)
        h.update(t.encode())
    return texts, h.hexdigest()[:12]


def get_tokenizer(vocab_size: int, cache_dir: Path | str = DEFAULT_CACHE, train_bytes: int | None = None,
                  verbose: bool = True):
    """A byte-level BPE tokenizer with ``vocab_size`` entries trained on ``train_bytes`` of stdlib source,
    then loaded from the cache. Default ``train_bytes``: 256 bytes per token (8 MB for 32768, ~4 s on
    2 cores); above 32768 tokens the whole stdlib (~34 MB), which is what reaching 65536 merges needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if train_bytes is None:
        train_bytes = max(vocab_size * 256, 1_000_000) if vocab_size <= 32768 else 1 << 30
    texts, fp = corpus(train_bytes)
    path = Path(cache_dir) / f"bpe-v{vocab_size}-{fp}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=verbose)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: concurrent runs never see half a file
    if verbose:
        if tok.get_vocab_size() < vocab_size:
            print(f"note: the corpus supports only {tok.get_vocab_size()} BPE tokens; ids stay < {vocab_size}")
        print(f"trained BPE tokenizer ({tok.get_vocab_size()} tokens, {sum(map(len, texts)) / 1e6:.1f} MB of "
              f"stdlib source) in {time.perf_counter() - t0:.1f}s -> {path}")
    return tok


def get_tokens(vocab_size: int, corpus_bytes: int, cache_dir: Path | str = DEFAULT_CACHE,
               verbose: bool = True) -> torch.Tensor:
    """The first ``corpus_bytes`` of stdlib source as one int64 token stream (documents separated by
    ``<|endoftext|>``), encoded with :func:`get_tokenizer` and cached."""
    tok = get_tokenizer(vocab_size, cache_dir, verbose=verbose)
    texts, fp = corpus(corpus_bytes)
    tok_fp = hashlib.sha1(tok.to_str().encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"tokens-{tok_fp}-{fp}.pt"
    if path.exists():
        return torch.load(path)
    eot = tok.token_to_id(SPECIAL)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    out = torch.tensor(ids, dtype=torch.long)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(out, tmp)
    os.replace(tmp, path)
    if verbose:
        print(f"encoded {sum(map(len, texts)) / 1e6:.1f} MB of stdlib source -> {out.numel():,} tokens")
    return out


def make_batches(tokens: torch.Tensor, steps: int, batch: int, seq: int, seed: int = 0):
    """``steps`` fixed (input, target) batches of random windows, identical for every caller with the
    same seed: each training variant sees exactly the same data in the same order."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq - 1, (steps, batch), generator=g)
    idx = starts[..., None] + torch.arange(seq + 1)
    windows = tokens[idx]  # steps x batch x (seq+1)
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]


class TokenBlocks(torch.utils.data.Dataset):
    """Non-overlapping blocks of ``seq`` tokens, as dicts for ``transformers.Trainer``
    (labels = input_ids; the model shifts them itself)."""

    def __init__(self, tokens: torch.Tensor, seq: int):
        n = tokens.numel() // seq
        self.blocks = tokens[: n * seq].view(n, seq)

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        b = self.blocks[i]
        return {"input_ids": b, "labels": b}


def profile_step(step_fn, device):
    """Run ``step_fn()`` (one training step) and return ``(its result, peak bytes, cce op calls)``.

    Peak bytes: the most memory the step allocated on top of what was live when it began.
    CUDA: ``torch.cuda.max_memory_allocated()`` after a reset, minus ``memory_allocated()`` before.
    CPU:  the same quantity for torch's CPU allocator, from the allocation/free events that
          ``torch.profiler(profile_memory=True)`` records for every tensor, whether allocated by an
          eager op or by an Inductor-generated kernel: the running sum of allocation sizes, maximised.
    cce op calls: profiler events of the ``cce::`` custom ops (the fast path's one op, or the low-memory
    path's forward and backward), i.e. proof that
    the compiled step really ran the rewritten loss.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=not cuda) as prof:
        out = step_fn()
        if cuda:
            torch.cuda.synchronize(device)
    cce_calls = sum(1 for e in prof.events() if e.name.startswith("cce::"))
    if cuda:
        return out, torch.cuda.max_memory_allocated(device) - base, cce_calls
    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            allocs.append((ev.start_time_ns, ev.extra_fields.alloc_size))
        stack.extend(ev.children)
    cur = peak = 0
    for _, size in sorted(allocs):
        cur += size
        peak = max(peak, cur)
    return out, peak, cce_calls
