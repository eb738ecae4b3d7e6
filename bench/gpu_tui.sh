#!/bin/bash
# H200: the TUI's recorded decode rate next to `beechat ask` (bench/tui_engine.py) on the synthetic
# Qwen3.6-27B-shaped target and its near-perfect draft (the models bench/gpu_spec.sh writes;
# PAIR=hybrid: the qwen35 pair, else the dense one).
# Run through the device tool from the repo root (see docs/benchmarks.md):
#   bash .gpu/device/setup.sh /opt/ls >/dev/null; export LD_LIBRARY_PATH=/opt/ls/llama_cpp/lib PYTHONPATH=/opt/ls:$PWD; bash bench/gpu_tui.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/tmp/m; mkdir -p $M
V=.gpu/data/ggml-vocab-qwen35.gguf; S=.gpu/tools/synth_gguf.py
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=${PYTHONPATH:-}:/tmp/site; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
if [ "${PAIR:-dense}" = hybrid ]; then  # the qwen35 pair of bench/gpu_spec.sh
  T=$M/hybrid.gguf D=$M/hdraft.gguf
  [ -f $T ] || python3 bench/synth_qwen35.py $T --vocab $V --draft-width 1024
  [ -f $D ] || python3 bench/synth_qwen35.py $D --vocab $V --shape draft-0.8b
else
  T=$M/target.gguf D=$M/good.gguf
  [ -f $T ] || python3 $S $T --vocab $V
  [ -f $D ] || python3 $S $D --vocab $V --n-layer 2 --n-ff 2048 --n-head 8 --n-head-kv 2 --head-dim 128 --layer-seed 7
fi
cat $T $D > /dev/null  # read once so load times are not disk-bound
python3 bench/tui_engine.py --target $T --draft $D --n-gpu-layers -1 \
  --draft-max ${DRAFT_MAX:-32} --max-tokens ${TOKENS:-512} --turns ${TURNS:-3} \
  --json-out $OUT/tui_engine.json 2>&1 | tee $OUT/tui_engine.txt
