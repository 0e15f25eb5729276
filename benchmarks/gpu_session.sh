#!/usr/bin/env bash
# One GPU call per part (a device call may run 10 minutes; the session's budget is short). Each step has
# its own time limit and writes its log under $OUT, so a step that runs long still leaves the others'.
#   PART=a     (default) CUDA tests of both paths, the shared peers table, fast_path_check.py variants
#   PART=b     token sweep 8k-64k (cce.op, cce.backend, torch.compile, Liger) and train_lm on CUDA
#   PART=step  the step benchmark over HF architectures (STEP_BENCH_ARGS, e.g. "--layers 16")
#   PART=dist  2 GPUs: the NCCL tests and distributed_bench.py (DDP / FSDP2 / TP)
#   PART=speed the fast path's d_weight accumulator variants at the Llama-3.2-1B shape (sweep, 8k-64k tokens) and
#              a kernel-time profile at 32k, after the CUDA tests and the peers table
#   PART=final the CUDA tests and the op-level table: llama3.2-1b, gemma2, llama3-8b x 8k-64k tokens, torch.compile,
#              the 3-matmul floor, cce.op, cce.backend, Liger
#   PART=lowmem the low-memory path's d_hidden schemes against torch.compile (8k-32k, two shapes) and a profile
#   PART=rl    the RL forms: the rewrite's CUDA tests, per-token log-probabilities with per-token gradients
#              (sweep.py --mode logp: the low-memory path) and no-grad scoring (--mode score) against
#              torch.compile, and the GRPO example's table at the Qwen2.5-0.5B and Llama-3.2-1B shapes (GRPO_TOKENS)
#   PART=harness  a check of every benchmark on one GPU in one call: the CUDA tests, the peers table,
#              fast_path_check.py --quick --kernels, sweep.py --large-n, a 2-layer Llama step_bench run
# Peers (optional) come as wheels in .whl/ (cut-cross-entropy 25.1.1, liger-kernel 0.8.5, --no-deps);
# the shared bench script as .bench/peers.py (a copy of ../shared/bench/peers.py, not committed).
set -u
export PYTHONUNBUFFERED=1 OUT=${OUT:-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
case "${PART:-a}" in
a)
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_fast.py \
    tests/test_rewrite_cuda.py 2>&1 | tail -15 | tee "$OUT/cuda_tests.log"
  [ -f .bench/peers.py ] && timeout 200 python3 .bench/peers.py --regimes zipf --reps 100 > "$OUT/peers.log" 2>&1
  tail -24 "$OUT/peers.log"
  timeout 150 python3 benchmarks/fast_path_check.py > "$OUT/fast_path_check.log" 2>&1
  tail -30 "$OUT/fast_path_check.log"
  ;;
b)
  timeout 330 python3 benchmarks/sweep.py --tokens 8192,16384,32768,65536 --rep 30 --warmup 10 --regime flat \
    --methods cce.op,cce.backend,torch.compile,liger_flce > "$OUT/sweep.log" 2>&1
  tail -30 "$OUT/sweep.log"
  timeout 150 python3 examples/train_lm.py --device cuda --steps 60 --vocab-size 32768 --out "$OUT/train_lm_cuda.png" \
    --cache-dir /tmp/cce_cache > "$OUT/train_lm_cuda.log" 2>&1
  tail -8 "$OUT/train_lm_cuda.log"
  ;;
step)
  timeout 580 python3 benchmarks/step_bench.py --budget-s "${STEP_BENCH_BUDGET:-540}" ${STEP_BENCH_ARGS:-} \
    > "$OUT/step_bench.log" 2>&1
  tail -40 "$OUT/step_bench.log"
  ;;
dist)
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_distributed_op.py \
    tests/test_distributed_train.py 2>&1 | tail -15 | tee "$OUT/nccl_tests.log"
  timeout 340 torchrun --nproc-per-node 2 benchmarks/distributed_bench.py --budget-s 300 \
    > "$OUT/distributed.log" 2>&1  # and $OUT/distributed_bench.json
  tail -30 "$OUT/distributed.log"
  ;;
speed)
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_fast.py \
    tests/test_rewrite_cuda.py 2>&1 | tail -15 | tee "$OUT/cuda_tests.log"
  [ -f .bench/peers.py ] && timeout 110 python3 .bench/peers.py --regimes zipf --reps 50 > "$OUT/peers.log" 2>&1
  tail -24 "$OUT/peers.log"
  timeout 200 python3 benchmarks/sweep.py --shapes llama3.2-1b --regime flat --warmup 10 --rep 40 \
    --methods "torch.compile,floor,cce.op,cce.op@fast_path_remainder=int8,cce.op@fast_path_max_tokens_per_chunk=8192,cce.op@fast_path_memory_fraction=0.5;fast_path_max_tokens_per_chunk=8192" \
    > "$OUT/sweep_variants.log" 2>&1
  tail -14 "$OUT/sweep_variants.log"
  timeout 80 python3 benchmarks/loss_head_profile.py --shape llama3.2-1b --tokens 32768 \
    --methods "torch.compile,floor,cce.op@fast_path_remainder=int8,cce.op@fast_path_max_tokens_per_chunk=8192" \
    2>&1 | grep -v USDT > "$OUT/profile.log"
  cat "$OUT/profile.log"
  ;;
final)
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_fast.py \
    tests/test_rewrite_cuda.py 2>&1 | tail -4 | tee "$OUT/cuda_tests.log"
  timeout 420 python3 benchmarks/sweep.py --shapes llama3.2-1b,gemma2,llama3-8b --regime flat --warmup 10 --rep 40 \
    --methods "torch.compile,floor,cce.op,cce.backend,liger_flce" > "$OUT/sweep.log" 2>&1
  tail -22 "$OUT/sweep.log"
  ;;
lowmem)
  timeout 330 python3 benchmarks/sweep.py --shapes llama3.2-1b,gemma2 --tokens 8192,16384,32768 --regime flat \
    --warmup 10 --rep 40 --methods "torch.compile,floor,cce.op@path=low_memory,cce.op@path=low_memory;low_memory_dhidden=cublas_fp32,cce.op@path=low_memory;low_memory_dhidden=cublas_fold" \
    > "$OUT/sweep_low_memory.log" 2>&1
  tail -12 "$OUT/sweep_low_memory.log"
  timeout 120 python3 benchmarks/loss_head_profile.py --shape gemma2 --tokens 8192 \
    --methods "torch.compile,cce.op@path=low_memory,cce.op@path=low_memory;low_memory_dhidden=cublas_fp32" \
    2>&1 | grep -v USDT > "$OUT/profile_low_memory.log"
  cat "$OUT/profile_low_memory.log"
  ;;
rl)
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_rewrite_cuda.py 2>&1 | tail -4 \
    | tee "$OUT/cuda_tests_rewrite.log"
  timeout 150 python3 benchmarks/sweep.py --mode logp --shapes gemma2,llama3 --tokens 8192,32768 --regime flat \
    --warmup 10 --rep 30 --methods torch.compile,floor,cce.op,cce.backend > "$OUT/sweep_logp.log" 2>&1
  tail -12 "$OUT/sweep_logp.log"
  timeout 100 python3 benchmarks/sweep.py --mode score --shapes gemma2,llama3 --tokens 8192,32768,65536 --regime flat \
    --warmup 10 --rep 30 --methods torch.compile,cce.op,cce.backend > "$OUT/sweep_score.log" 2>&1
  tail -12 "$OUT/sweep_score.log"
  for shape in qwen2.5-0.5b llama3.2-1b; do
    timeout 115 python3 examples/grpo_step.py --device cuda --shape $shape --tokens "${GRPO_TOKENS:-16384,32768}" \
      > "$OUT/grpo_$shape.log" 2>&1
    tail -6 "$OUT/grpo_$shape.log"
  done
  ;;
harness)
  timeout 140 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_fast.py 2>&1 \
    | tail -15 | tee "$OUT/cuda_tests.log"
  [ -f .bench/peers.py ] && timeout 100 python3 .bench/peers.py --regimes zipf --reps 100 > "$OUT/peers.log" 2>&1
  tail -24 "$OUT/peers.log"
  timeout 170 python3 benchmarks/fast_path_check.py --quick --kernels > "$OUT/fast_path_check.log" 2>&1
  tail -40 "$OUT/fast_path_check.log"
  timeout 70 python3 benchmarks/sweep.py --large-n > "$OUT/large_n.log" 2>&1
  tail -10 "$OUT/large_n.log"
  timeout 95 python3 benchmarks/step_bench.py --archs llama --layers 2 --phases fixed --budget-s 85 \
    --compile-limit-s 60 > "$OUT/step_bench.log" 2>&1
  tail -12 "$OUT/step_bench.log"
  ;;
*) echo "PART must be a, b, step, dist, speed, final, lowmem, rl or harness" >&2; exit 2 ;;
esac
