"""The examples run end to end at a tiny size, the rewrite fires in them, and it changes no numbers.

``train_lm`` uses the ``aot_eager`` inner compiler by default here (seconds); the Inductor variant and
the HF Trainer example (its Trainer compiles with Inductor) compile for real and are marked slow (~20-60 s
each on 2 CPU cores).
"""
import importlib
import math
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _example(name):
    sys.path.insert(0, EXAMPLES)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(EXAMPLES)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cce_cache"))


def _check_train_lm(out, png):
    assert out["rewrites"] == 1, out["report"]
    assert len(out["report"].misses) == 0, out["report"]
    by = {r["variant"]: r for r in out["results"]}
    assert set(by) == {"eager", "compile", "cce"}
    # the cce op really ran in the profiled step, and only in the cce variant: the fast path's one op (its
    # backward is a plain in-place scaling), or the low-memory path's forward + backward ops
    assert by["cce"]["cce_calls"] in (1, 2)
    assert by["eager"]["cce_calls"] == by["compile"]["cce_calls"] == 0
    # same init, same batches: every step's loss agrees across the three ways
    steps = out["preset"]["steps"]
    for r in by.values():
        assert len(r["losses"]) == steps and all(math.isfinite(x) for x in r["losses"])
        assert r["peak_bytes"] > 0 and r["tokens_per_s"] > 0
        for a, b in zip(r["losses"], by["eager"]["losses"]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    assert by["eager"]["losses"][-1] < by["eager"]["losses"][0]  # it learns
    assert os.path.getsize(png) > 10_000


def test_train_lm_tiny_aot_eager(tmp_path, cache_dir):
    train_lm = _example("train_lm")
    png = tmp_path / "curves.png"
    out = train_lm.main(["--tiny", "--inner", "aot_eager", "--out", str(png), "--cache-dir", cache_dir])
    _check_train_lm(out, png)


@pytest.mark.slow
def test_train_lm_tiny_inductor(tmp_path, cache_dir):
    train_lm = _example("train_lm")
    png = tmp_path / "curves.png"
    out = train_lm.main(["--tiny", "--steps", "4", "--out", str(png), "--cache-dir", cache_dir])
    _check_train_lm(out, png)


def test_data_is_deterministic_and_cached(cache_dir):
    _data = _example("_data")
    a = _data.get_tokens(512, 300_000, cache_dir, verbose=False)
    b = _data.get_tokens(512, 300_000, cache_dir, verbose=False)
    assert a.equal(b) and a.numel() > 10_000 and int(a.max()) < 512
    files = os.listdir(cache_dir)
    assert any(f.startswith("bpe-v512-") for f in files) and any(f.startswith("tokens-") for f in files)
    x1, y1 = _data.make_batches(a, 3, 2, 16, seed=0)[2]
    x2, y2 = _data.make_batches(a, 3, 2, 16, seed=0)[2]
    assert x1.equal(x2) and y1.equal(y2) and x1[:, 1:].equal(y1[:, :-1])


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_hf_trainer_tiny(cache_dir, checkpointing):
    """The example's default: Trainer(torch_compile=True) + integrations.transformers.enable. The report of the
    Trainer's own step shows one rewrite with the logits dead, and the profiled step ran the cce op."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = _example("hf_trainer")
    out = hf.main(["--tiny", "--device", "cpu", "--cache-dir", cache_dir]
                  + (["--gradient-checkpointing"] if checkpointing else []))
    assert out["rewrites"] == 1 and not out["report"].misses, out["report"]
    assert not out["report"].rewrites[0].logits_kept
    run = out["runs"]["integration"]
    assert run["cce_calls"] in (1, 2)  # the Trainer's compiled step ran the cce op(s): fast path 1, low-memory 2
    assert len(run["losses"]) == 4 and all(math.isfinite(x) for x in run["losses"])


@pytest.mark.slow
def test_hf_trainer_tiny_install_leaves_the_loss_to_inductor(cache_dir):
    """--how install: the Trainer compiles the whole model; the logits are a graph output, so no cce op runs
    and explain says why."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = _example("hf_trainer")
    out = hf.main(["--tiny", "--device", "cpu", "--cache-dir", cache_dir, "--how", "install"])
    assert out["rewrites"] == 0 and out["runs"]["install"]["cce_calls"] == 0


def _check_grpo(out, variants):
    by = {r["variant"]: r for r in out["results"]}
    assert set(by) == set(variants)
    cce = by["cce"]
    assert not cce["misses"], cce["misses"]
    # scoring (old policy, reference) and the loss: three graphs, one op call each, no logits kept
    assert len(cce["rewrites"]) == 3 and not any(r.logits_kept for r in cce["rewrites"]), cce["rewrites"]
    loss_rw = [r for r in cce["rewrites"] if "mean_logit" in r.options.get("reads", "")]
    assert len(loss_rw) == 1 and loss_rw[0].options["reads"] == "log_prob+logsumexp+mean_logit", loss_rw
    assert cce["cce_calls"] > 0 and all(by[v]["cce_calls"] == 0 for v in by if v != "cce")
    for r in by.values():
        assert len(r["losses"]) == out["preset"]["steps"] and all(math.isfinite(x) for x in r["losses"])
        for a, b in zip(r["losses"], by["eager"]["losses"]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert by["eager"]["losses"][-1] < by["eager"]["losses"][0]  # the objective goes down


def test_grpo_step_tiny_aot_eager():
    """The GRPO example at a tiny size: the policy's log-probabilities + entropy and both no-grad scorings are
    rewritten (one op call each, logits never formed), and the losses equal eager's (the example asserts it
    too). torch.compile without the rewrite: the slow twin below."""
    out = _example("grpo_step").main(["--tiny", "--inner", "aot_eager", "--no-explain", "--variants", "eager,cce",
                                      "--steps", "2"])
    _check_grpo(out, ("eager", "cce"))


@pytest.mark.slow
def test_grpo_step_tiny_inductor_all_variants():
    out = _example("grpo_step").main(["--tiny", "--steps", "2"])
    _check_grpo(out, ("eager", "compile", "cce"))
    assert out["report"] is not None and len(out["report"].rewrites) == 1


@pytest.mark.slow
def test_grpo_step_gpu_table_dry_run():
    """The GPU table's code (``--device cuda``) on the CPU at a tiny size: every variant measured, the cce one
    rewritten three times (the policy's loss, the old policy's and the reference's scoring)."""
    rows = _example("grpo_step").main(["--dry-run"])
    assert [r["tokens"] for r in rows] == [16, 32]
    for r in rows:
        assert r["cce"]["rewrites"] == 3 and r["eager"]["rewrites"] == r["compile"]["rewrites"] == 0
        assert all(r[v]["step_ms"] > 0 and r[v]["score_ms"] > 0 for v in ("eager", "compile", "cce"))
