#!/usr/bin/env bash
# The H200 run (bench/gpu.py, every phase). Device tool call: command "bash bench/run_gpu.sh", carry [".whl"], timeout_s 540.
# .whl (gitignored) holds open_clip_torch 3.3.0, ftfy, wcwidth, pydantic (+core, annotated-types, typing-inspection) and pyarrow wheels for CPython 3.12;
# recreate it with the `pip download` line in docs/benchmarks.md. bench/gpu.py stops itself after BUDGET s.
set -o pipefail
OUT="${OUT:-$PWD/bench/results/gpu}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia-smi.txt" 2>&1
python3 bench/gpu.py --out "$OUT" --budget "${BUDGET:-480}" ${GPU_ARGS:-} 2>&1 | tee "$OUT/gpu.log"
