#!/usr/bin/env bash
# The multi-process training path on a GPU machine (one GPU or several), offline: for each mode (ddp, fsdp2, and
# zero2 and zero3 where DeepSpeed imports) a few ORPO optimiser steps of a random-weight Llama built locally (~0.2 B
# parameters by default; no hub, no internet) under torchrun with NCCL, through benchmarks/dist_step.py.
# Prints ONE JSON object: the machine, then per mode the step time, tokens/s, peak memory
# (torch.cuda.max_memory_allocated, max over ranks) and the step losses (which should agree across modes).
#
#   bash benchmarks/gpu_check.sh                 # every GPU, size small
#   NGPU=2 SIZE=medium STEPS=8 bash benchmarks/gpu_check.sh
# Environment: PYTHON (default: .venv/bin/python if present, else python3), NGPU, SIZE (tiny|small|medium),
# STEPS, BATCH (global pairs per step), GRAD_ACCUM, LEN (prompt and completion length), MODES, TIMEOUT (s per mode).
# CPU_SMOKE=1: the same flow on the CPU (gloo, 2 processes, tiny model), to check the script without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ "${CPU_SMOKE:-0}" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  NGPU=${NGPU:-2} SIZE=${SIZE:-tiny} LEN=${LEN:-24} STEPS=${STEPS:-4}
fi
NGPU=${NGPU:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
SIZE=${SIZE:-small}
STEPS=${STEPS:-6}
BATCH=${BATCH:-16}
GRAD_ACCUM=${GRAD_ACCUM:-2}
LEN=${LEN:-256}
TIMEOUT=${TIMEOUT:-240}
MODES=${MODES:-ddp fsdp2 zero2 zero3}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$OUT/torch_extensions}

if [ "$NGPU" -lt 1 ]; then  # (CPU_SMOKE=1 runs the flow on the CPU)
  echo '{"error": "no CUDA GPU visible to torch"}'
  exit 1
fi
for mode in $MODES; do
  if [[ $mode == zero* ]] && ! "$PYTHON" -c 'import deepspeed' >/dev/null 2>&1; then
    echo "{\"mode\": \"$mode\", \"skipped\": \"deepspeed is not installed (DS_BUILD_OPS=0 pip install --no-deps deepspeed hjson ninja py-cpuinfo msgpack einops)\"}" > "$OUT/$mode.json"
    continue
  fi
  timeout "$TIMEOUT" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" \
    benchmarks/dist_step.py --mode "$mode" --size "$SIZE" --steps "$STEPS" --batch "$BATCH" \
    --grad-accum "$GRAD_ACCUM" --prompt-len "$LEN" --completion-len "$LEN" --out "$OUT/$mode.json" \
    > "$OUT/$mode.log" 2>&1
  rc=$?
  if [ ! -s "$OUT/$mode.json" ]; then
    "$PYTHON" - "$mode" "$rc" "$OUT/$mode.log" > "$OUT/$mode.json" <<'PY'
import json, sys
mode, rc, log = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], errors="replace").read()
print(json.dumps({"mode": mode, "failed": f"exit {rc}" + (" (timeout)" if rc == 124 else ""),
                  "log_tail": log[-1500:]}))
PY
  fi
done
"$PYTHON" - "$OUT" $MODES <<'PY'
import json, sys
from pathlib import Path

import torch

out, modes = Path(sys.argv[1]), sys.argv[2:]
cuda = torch.cuda.is_available()
res = {"gpus": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name(0) if cuda else None,
       "torch": torch.__version__,
       "cuda": torch.version.cuda, "modes": {}}
for m in modes:
    d = json.loads((out / f"{m}.json").read_text())
    d.pop("mode", None)
    res["modes"][m] = d
print(json.dumps(res, allow_nan=False))
PY
