#!/usr/bin/env bash
# The HELIP experiment on a GPU box (the device tool's H200): carried wheels in .whl (open_clip_torch,
# ftfy, wcwidth, pydantic + its deps; see docs/benchmarks.md for the pip download line), results.jsonl
# copied to $OUT every few seconds so that a run cut short still returns what it finished.
set -o pipefail
OUT="${OUT:-$PWD/runs/gpu-experiment}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORK=/tmp/helip-experiment
(while sleep 5; do cp "$WORK/results.jsonl" "$OUT/" 2>/dev/null; done) &
COPIER=$!
python3 experiments/helip_synth.py --out "$WORK" --workers 12 --gen-workers 12 ${EXP_ARGS:-} 2>&1 \
  | grep -v "No pretrained weights" | tee "$OUT/experiment.log"
rc=$?
kill $COPIER; cp "$WORK/results.jsonl" "$OUT/" 2>/dev/null; cp "$WORK/world/preview.png" "$OUT/" 2>/dev/null
exit $rc
