#!/bin/bash
# H200: the TUI's recorded decode rate next to `beechat ask` (bench/tui_engine.py) on the synthetic
# Qwen3.6-27B-shaped target and its near-perfect draft (the models bench/gpu_spec.sh writes).
# Run through the device tool from the repo root (see docs/benchmarks.md):
#   bash .gpu/device/setup.sh /opt/ls >/dev/null; export LD_LIBRARY_PATH=/opt/ls/llama_cpp/lib PYTHONPATH=/opt/ls:$PWD; bash bench/gpu_tui.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/tmp/m; mkdir -p $M
V=.gpu/data/ggml-vocab-qwen35.gguf; S=.gpu/tools/synth_gguf.py
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=${PYTHONPATH:-}:/tmp/site; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
[ -f $M/target.gguf ] || python3 $S $M/target.gguf --vocab $V
[ -f $M/good.gguf ] || python3 $S $M/good.gguf --vocab $V --n-layer 2 --n-ff 2048 --n-head 8 --n-head-kv 2 --head-dim 128 --layer-seed 7
cat $M/*.gguf > /dev/null  # read once so load times are not disk-bound
python3 bench/tui_engine.py --target $M/target.gguf --draft $M/good.gguf --n-gpu-layers -1 \
  --draft-max ${DRAFT_MAX:-32} --max-tokens ${TOKENS:-512} --turns ${TURNS:-3} \
  --json-out $OUT/tui_engine.json 2>&1 | tee $OUT/tui_engine.txt
