#!/usr/bin/env bash
# Launch an SGLang 0.5.23 server for a block-diffusion checkpoint (SDAR / TraDo / LLaDA2) with LightningRL's
# `lrl_dllm` plugin: sampled decoding (temperature / top-k / top-p per request) and per-token step maps.
#
# Run it with the python of SGLang's OWN virtual environment (SGLang pins torch/transformers/CUDA 13), into which
# this repository was installed WITHOUT dependencies, so its plugin entry point is visible:
#     /path/to/sglang-venv/bin/pip install --no-deps -e /path/to/lightningrl
#     SGLANG_PYTHON=/path/to/sglang-venv/bin/python scripts/launch_sglang.sh --model /ckpt/SDAR-8B-Chat-b32 --port 30000
#
# Flags (defaults in brackets):
#   --model DIR                 checkpoint directory (required)
#   --host H / --port P         bind address [127.0.0.1] / port [30000]
#   --block-size N              decoding block size [32]
#   --strategy S                low_confidence_dynamic | low_confidence_static | sequential [low_confidence_dynamic]
#   --threshold X               dynamic-strategy confidence threshold [0.9]
#   --denoising-steps N         steps per block of the static / sequential strategies [32]
#   --seed N                    sampling seed (identical on all TP ranks) [0]
#   --max-running-requests N    concurrent requests; SGLang's dLLM default is 1, keep >= rollout rows per server [128]
#   --tp N                      tensor-parallel size [1]
#   --mem-fraction F            --mem-fraction-static for SGLang [SGLang's default]
#   --no-memory-saver           drop --enable-memory-saver (then release/resume_memory_occupation are unavailable)
#   --config-dir DIR            where the generated algorithm YAML goes [a fresh temp dir]
#   --python PY                 interpreter of the SGLang environment [$SGLANG_PYTHON or python]
#   --dry-run                   print the YAML and the command, start nothing
#   -- ARGS...                  passed verbatim to sglang.launch_server (e.g. --attention-backend flashinfer)
set -euo pipefail

die() { echo "launch_sglang.sh: $*" >&2; exit 2; }

MODEL="" HOST="127.0.0.1" PORT="30000" BLOCK_SIZE="32" STRATEGY="low_confidence_dynamic" THRESHOLD="0.9"
DENOISING_STEPS="32" SEED="0" MAX_RUNNING="128" TP="1" MEM_FRACTION="" MEMORY_SAVER=1 CONFIG_DIR="" DRY_RUN=0
PY="${SGLANG_PYTHON:-python}"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model|--model-path) MODEL="${2:?--model needs a value}"; shift 2 ;;
    --host) HOST="${2:?}"; shift 2 ;;
    --port) PORT="${2:?}"; shift 2 ;;
    --block-size) BLOCK_SIZE="${2:?}"; shift 2 ;;
    --strategy) STRATEGY="${2:?}"; shift 2 ;;
    --threshold) THRESHOLD="${2:?}"; shift 2 ;;
    --denoising-steps) DENOISING_STEPS="${2:?}"; shift 2 ;;
    --seed) SEED="${2:?}"; shift 2 ;;
    --max-running-requests) MAX_RUNNING="${2:?}"; shift 2 ;;
    --tp) TP="${2:?}"; shift 2 ;;
    --mem-fraction) MEM_FRACTION="${2:?}"; shift 2 ;;
    --no-memory-saver) MEMORY_SAVER=0; shift ;;
    --config-dir) CONFIG_DIR="${2:?}"; shift 2 ;;
    --python) PY="${2:?}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown flag $1 (see --help)" ;;
  esac
done

[[ -n "$MODEL" ]] || die "--model DIR is required"
[[ $DRY_RUN == 1 || -f "$MODEL/config.json" ]] || die "$MODEL is not a checkpoint directory (no config.json)"
case "$STRATEGY" in low_confidence_dynamic|low_confidence_static|sequential) ;; *) die "bad --strategy $STRATEGY" ;; esac
for v in PORT BLOCK_SIZE DENOISING_STEPS MAX_RUNNING TP; do
  [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -gt 0 ]] || die "--${v,,} must be a positive integer, got '${!v}'"
done
[[ "$SEED" =~ ^[0-9]+$ ]] || die "--seed must be a non-negative integer, got '$SEED'"
[[ "$THRESHOLD" =~ ^(0(\.[0-9]+)?|1(\.0+)?)$ ]] || die "--threshold must be in [0, 1], got '$THRESHOLD'"

CONFIG_DIR="${CONFIG_DIR:-$(mktemp -d -t lrl-sglang-XXXXXX)}"
mkdir -p "$CONFIG_DIR"
CFG="$CONFIG_DIR/lrl_dllm_${PORT}.yaml"
cat > "$CFG" <<EOF
# LRLLowConfidence algorithm config (lrl.rollout.sglang_plugin.PluginAlgoConfig)
block_size: $BLOCK_SIZE
strategy: $STRATEGY
threshold: $THRESHOLD
denoising_steps: $DENOISING_STEPS
seed: $SEED
EOF

CMD=("$PY" -m sglang.launch_server
  --model-path "$MODEL"
  --dllm-algorithm LRLLowConfidence
  --dllm-algorithm-config "$CFG"
  --max-running-requests "$MAX_RUNNING"
  --tp-size "$TP"
  --trust-remote-code
  --host "$HOST" --port "$PORT")
[[ $MEMORY_SAVER == 1 ]] && CMD+=(--enable-memory-saver)
[[ -n "$MEM_FRACTION" ]] && CMD+=(--mem-fraction-static "$MEM_FRACTION")
CMD+=("${EXTRA[@]}")

# SGLANG_PLUGINS is SGLang's comma-separated whitelist of general plugins: add ours to what the caller already
# whitelisted (once; unset = only ours, since an empty whitelist would load every installed plugin).
case ",${SGLANG_PLUGINS:-}," in
  *,lrl_dllm,*) ;;
  *) SGLANG_PLUGINS="${SGLANG_PLUGINS:+$SGLANG_PLUGINS,}lrl_dllm" ;;
esac
export SGLANG_PLUGINS

if [[ $DRY_RUN == 1 ]]; then
  echo "# $CFG"
  cat "$CFG"
  echo "SGLANG_PLUGINS=$SGLANG_PLUGINS $(printf '%q ' "${CMD[@]}")"
  exit 0
fi

"$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("sglang") is None)' \
  || die "$PY has no sglang: point --python / SGLANG_PYTHON at SGLang's environment (pip install sglang==0.5.23)"
"$PY" - <<'EOF' || die "the lrl_dllm plugin is not installed in $PY's environment: run '$PY -m pip install --no-deps -e <this repository>'"
from importlib.metadata import entry_points
import sys
names = {ep.name for ep in entry_points(group="sglang.srt.plugins")}
if "lrl_dllm" not in names:
    sys.exit(1)
import lrl.rollout.sglang_plugin  # noqa: F401  (importable with torch only)
EOF

exec "${CMD[@]}"
