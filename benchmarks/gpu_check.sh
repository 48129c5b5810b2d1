#!/usr/bin/env bash
# The GPU check: the sweep and TReFT benchmarks on SmolLM2-135M-Instruct's shape, on one GPU,
# in bfloat16 and float32, each writing its JSON under OUT. Under 8 minutes on one H100/H200.
#
#   benchmarks/gpu_check.sh OUT             # on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh OUT --dry-run   # on the CPU, tiny sizes: checks the script (CI)
#
# The model: $GPU_CHECK_MODEL (a name or directory) if set; else, when .device/smollm2-shape
# exists (benchmarks/random_model.py export smollm2-135m-instruct .device/smollm2-shape), random
# weights of that exact shape (timings depend on shapes, not values; the device machine cannot
# take the 538 MB of real weights); else the embedded model. machine.json says which it was.
set -euo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUT [--dry-run]}
MODE=${2:-}
PY=${PYTHON:-python3}
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$MODE" == "--dry-run" ]]; then
  DEVICE=cpu; DTYPES="float32"; SWEEP_ARGS="--layers 1"; TREFT_ARGS="--steps 1 --batch-size 2"
  export OMP_NUM_THREADS=1
elif [[ -z "$MODE" ]]; then
  DEVICE=cuda; DTYPES="bfloat16 float32"; SWEEP_ARGS=""; TREFT_ARGS="--steps 10 --batch-size 16"
else
  echo "unknown option $MODE; use --dry-run or nothing" >&2; exit 2
fi

MODEL=${GPU_CHECK_MODEL:-}
if [[ -z "$MODEL" && -d "$HERE/../.device/smollm2-shape" ]]; then
  MODEL="$OUT/.smollm2-random"
  "$PY" "$HERE/random_model.py" build "$HERE/../.device/smollm2-shape" "$MODEL" >/dev/null
  WEIGHTS="random (SmolLM2-135M-Instruct's config and tokenizer, seed 0)"
fi
MODEL=${MODEL:-smollm2-135m-instruct}
WEIGHTS=${WEIGHTS:-"as loaded from $MODEL"}

start=$(date +%s)
"$PY" - "$OUT/machine.json" "$DEVICE" "$MODEL" "$WEIGHTS" <<'PYEOF'
import json, platform, sys
import torch
out, device, model, weights = sys.argv[1:]
info = {"device": device, "model": model, "weights": weights, "torch": torch.__version__,
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --dry-run on a CPU machine")
    info["gpu"] = torch.cuda.get_device_name(0)
    info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
json.dump(info, open(out, "w"), indent=2)
print(json.dumps(info))
PYEOF
for dtype in $DTYPES; do
  "$PY" "$HERE/bench_sweep.py" --json --device "$DEVICE" --dtype "$dtype" --model "$MODEL" \
    $SWEEP_ARGS > "$OUT/sweep-$dtype.json"
  cat "$OUT/sweep-$dtype.json"
  "$PY" "$HERE/bench_treft.py" --json --device "$DEVICE" --dtype "$dtype" --model "$MODEL" \
    $TREFT_ARGS > "$OUT/treft-$dtype.json"
  cat "$OUT/treft-$dtype.json"
done
rm -rf "$OUT/.smollm2-random"
echo "{\"gpu_check_seconds\": $(( $(date +%s) - start ))}" | tee "$OUT/done.json"
