"""What the step benchmark runs: the architectures (HF configs with the released models' shapes), the
variants, the sizes of the fixed phase and of the search's first attempt."""
from __future__ import annotations

VARIANTS = ("eager", "compile", "cce", "liger")
COMPILED = ("compile", "cce")
LABELS = {"eager": "eager", "compile": "torch.compile", "cce": 'torch.compile(backend="cce")',
          "liger": "Liger (eager)"}

# name: (config class, model class, config kwargs, default seq len, default sequences per step, liger fn)
ARCHS = {
    "llama3.2-1b": ("LlamaConfig", "LlamaForCausalLM",
                    dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, head_dim=64),
                    2048, 8, "apply_liger_kernel_to_llama"),
    "qwen2.5-0.5b": ("Qwen2Config", "Qwen2ForCausalLM",
                     dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                          intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                          max_position_embeddings=32768),
                     2048, 8, "apply_liger_kernel_to_qwen2"),
    "gemma2-2b": ("Gemma2Config", "Gemma2ForCausalLM",
                  dict(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=256, intermediate_size=9216, vocab_size=256000, tie_word_embeddings=True,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=256,
                       sliding_window=4096, max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh"),
                  1024, 8, "apply_liger_kernel_to_gemma2"),
}
ALIASES = {"llama": "llama3.2-1b", "qwen": "qwen2.5-0.5b", "qwen2": "qwen2.5-0.5b", "gemma": "gemma2-2b",
           "gemma2": "gemma2-2b"}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, max_position_embeddings=256)
TINY_EXTRA = {"gemma2-2b": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
              "llama3.2-1b": dict(head_dim=16)}
TINY_SEQ, TINY_BATCH = 32, 4


def shape_of(a, arch):
    """(sequences per step, sequence length) of the fixed phase; the search uses the same length."""
    _, _, _, seq, nseq, _ = ARCHS[arch]
    if a.tiny:
        seq, nseq = TINY_SEQ, TINY_BATCH
    s = a.seq or seq
    return max(1, (a.tokens // s) if a.tokens else nseq), s


def probe_of(a, arch):
    """Sequences of the search's first attempt: an upper bound, compiled ahead (see Worker.precompile)."""
    b, _ = shape_of(a, arch)
    return max(2, min(a.max_seqs, a.search_probe * b))


def err(ex):
    text = str(ex).strip().splitlines()
    return f"{type(ex).__name__}: {text[0][:300] if text else ''}"


def is_oom(ex):
    import torch

    text = str(ex)
    return isinstance(ex, torch.OutOfMemoryError) or (isinstance(ex, RuntimeError) and (
        "out of memory" in text or "ALLOC_FAILED" in text))  # e.g. CUBLAS_STATUS_ALLOC_FAILED
