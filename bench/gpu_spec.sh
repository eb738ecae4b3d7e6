#!/bin/bash
# H200 benchmark of beechat's speculative loop on a synthetic Qwen3.6-27B-shaped target.
# Run through the device tool from the repo root (see docs/benchmarks.md):
#   bash .gpu/device/setup.sh /opt/ls >/dev/null; export LD_LIBRARY_PATH=/opt/ls/llama_cpp/lib PYTHONPATH=/opt/ls:$PWD; bash bench/gpu_spec.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/tmp/m; mkdir -p $M
V=.gpu/data/ggml-vocab-qwen35.gguf; S=.gpu/tools/synth_gguf.py
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=${PYTHONPATH:-}:/tmp/site; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
t=$(date +%s)
# target: 64 dense layers shaped like Qwen3.6-27B, layer weights zero (a bigram model with the real cost)
[ -f $M/target.gguf ] || python3 $S $M/target.gguf --vocab $V
# near-perfect draft: 2 small layers, same embeddings/head seed -> the same bigram function
[ -f $M/good.gguf ] || python3 $S $M/good.gguf --vocab $V --n-layer 2 --n-ff 2048 --n-head 8 --n-head-kv 2 --head-dim 128 --layer-seed 7
# useless draft: another head -> agrees only by chance
[ -f $M/useless.gguf ] || python3 $S $M/useless.gguf --vocab $V --n-layer 2 --n-ff 2048 --n-head 8 --n-head-kv 2 --head-dim 128 --layer-seed 7 --head-seed 5
echo "models written in $(( $(date +%s) - t ))s"; ls -la $M
cat $M/*.gguf > /dev/null  # read once so load times are not disk-bound
python3 bench/spec_bench.py --target $M/target.gguf --draft good=$M/good.gguf --draft useless=$M/useless.gguf \
  --draft ngram=ngram --tokens ${TOKENS:-256} --ks ${KS:-4,8,15} --draft-max ${DRAFT_MAX:-16,32} --repeat ${REPEAT:-2} \
  --json-out $OUT/spec_bench.json 2>&1 | tee $OUT/spec_bench.txt
# KV cache type vs context depth: 16 attention layers with Qwen3.6-27B's attention shape (its real KV size)
[ -f $M/kv16.gguf ] || python3 $S $M/kv16.gguf --vocab $V --n-layer 16
cat $M/kv16.gguf > /dev/null
python3 bench/kv_depth.py --model $M/kv16.gguf --types f16,q8_0,q4_0 --depths ${DEPTHS:-0,32768,131072} \
  --json-out $OUT/kv_depth.json 2>&1 | tee $OUT/kv_depth.txt
