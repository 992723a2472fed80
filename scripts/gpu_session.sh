#!/usr/bin/env bash
# The GPU checks and figures of the engine work, on a lent GPU machine (README "Engine speed on a GPU"): the marked
# GPU tests, the block-forward/engine benchmark at the SDAR-8B and SDAR-1.7B shapes (with CUDA graphs) and one whole
# RL step at the SDAR-1.7B shape; first, two `lrl fit` RL steps at that shape measured against the memory plan
# (plan-1.7b: scripts/gpu_plan_check.py, docs/memory.md). Each part has its own time limit, so one failure leaves
# the others' results; everything lands in $OUT (default outputs/gpu). PARTS picks and orders the parts.
#
#   bash scripts/gpu_session.sh                          # all parts, on the GPU machine
#   PARTS="tests engine-8b" bash scripts/gpu_session.sh  # some of them
#   SMOKE=1 bash scripts/gpu_session.sh                  # the benchmark parts at the tiny shape on CPU (script check)
# Packages the GPU machine lacks travel as wheels in .whl/ (installed to /tmp/site when that folder exists).
set -u
OUT=${OUT:-outputs/gpu}
PARTS=${PARTS:-plan-1.7b tests engine-8b rl-step engine-1.7b fit-tests}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
LOG="$OUT/session.log"
if [ -d .whl ] && [ -z "${SMOKE:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || exit 1
else
  export PYTHONPATH="$PWD"
fi
step() { local limit=$1; shift; echo "=== $* (limit ${limit}s)" | tee -a "$LOG"; local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "=== exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$LOG"; }

if [ -n "${SMOKE:-}" ]; then
  DEV=(--device cpu --dtype float32); BIG=tiny; MID=tiny; GRAPHS=()
  FWD=(--batches 1 4 --block-size 4 --prompt-len 8 --max-new-tokens 8 --tpf 2 --engine-batches 1 4)
  RL=(--prompts 2 --samples 2 --prompt-len 8 --max-new-tokens 8 --block-size 4 --tpf 2)
  PLAN=(--smoke)
  PARTS=${PARTS//tests/}; PARTS=${PARTS//fit-/}
else
  DEV=(--device cuda --dtype bfloat16); BIG=sdar-8b; MID=sdar-1.7b; GRAPHS=(--cuda-graphs)
  FWD=(--batches 1 16 64 128 --engine-batches 1 16 --max-new-tokens 64)
  RL=(--gradient-checkpointing)
  PLAN=(--prompts-per-step 2 --group-size 2)  # 4 responses: the peaks are the full config's (fixed KV budget)
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import torch, transformers, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'lightning', lightning.__version__)"; } 2>&1 | tee -a "$LOG"
fi
for part in $PARTS; do
  case $part in
    tests) step 150 $PY -m pytest -o addopts="" -m gpu -q -p no:cacheprovider tests/test_gpu_graphs.py \
             tests/test_gpu_decode_attention.py ;;
    engine-8b) step 200 $PY scripts/bench_engine.py --shape "$BIG" "${DEV[@]}" "${FWD[@]}" "${GRAPHS[@]}" \
                 --compare dense --out "$OUT/engine_$BIG.json" ;;
    rl-step) step 200 $PY scripts/bench_rl_step.py --shape "$MID" "${DEV[@]}" "${RL[@]}" \
               --out "$OUT/rl_step_$MID.json" ;;
    engine-1.7b) step 120 $PY scripts/bench_engine.py --shape "$MID" "${DEV[@]}" "${FWD[@]}" "${GRAPHS[@]}" \
                   --compare dense flex --out "$OUT/engine_$MID.json" ;;
    plan-1.7b) step 400 $PY scripts/gpu_plan_check.py "${PLAN[@]}" --out "$OUT/plan_1p7b" \
                 --checkpoint-dir "${CKPT_DIR:-/tmp/lrl_sdar_like}" ;;
    fit-tests) step 200 $PY -m pytest -o addopts="" -m gpu -q -p no:cacheprovider tests/test_gpu.py ;;
    *) echo "unknown part: $part" | tee -a "$LOG" ;;
  esac
done
echo "=== done" | tee -a "$LOG"
