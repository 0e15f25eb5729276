#!/usr/bin/env bash
# One GPU session, everything in one call (the device budget is short): CUDA tests, the shared peers
# table, the main example on CUDA and the token sweep. Each step has its own time limit and writes
# its log under $OUT, so a step that runs long still leaves the others' results.
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
[ "${STEP_BENCH:-0}" = 1 ] && { timeout 580 python3 benchmarks/step_bench.py --budget-s "${STEP_BENCH_BUDGET:-540}" ${STEP_BENCH_ARGS:-} > "$OUT/step_bench.log" 2>&1; tail -40 "$OUT/step_bench.log"; exit 0; }  # only the step benchmark (STEP_BENCH.md)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_rewrite_cuda.py 2>&1 | tail -15 | tee "$OUT/cuda_tests.log"
[ -f .bench/peers.py ] && timeout 170 python3 .bench/peers.py --regimes zipf --reps 100 > "$OUT/peers.log" 2>&1
tail -12 "$OUT/peers.log"
timeout 120 python3 examples/train_lm.py --device cuda --steps 60 --vocab-size 32768 --out "$OUT/train_lm_cuda.png" \
  --cache-dir /tmp/cce_cache > "$OUT/train_lm_cuda.log" 2>&1
tail -8 "$OUT/train_lm_cuda.log"
timeout 150 python3 benchmarks/sweep.py --tokens 8192,16384,32768,65536 --rep 50 --warmup 10 --regime flat \
  --methods cce.op,torch.compile,liger_flce,apple_cce > "$OUT/sweep.log" 2>&1
tail -30 "$OUT/sweep.log"
