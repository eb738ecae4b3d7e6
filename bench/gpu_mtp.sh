#!/bin/bash
# H200 benchmark of MTP drafting on a synthetic Qwen3.6-27B-shaped qwen35 target with an MTP block:
# plain vs MTP vs a draft model vs n-gram through beechat's loop in one process (bench/spec_bench.py),
# a disagreeing MTP head, and llama.cpp's own C++ loop (llama-speculative-simple --spec-type draft-mtp)
# on the same file in the same run. Run through the device tool from the repo root, like gpu_spec.sh:
#   bash .gpu/device/setup.sh /opt/ls >/dev/null; export LD_LIBRARY_PATH=/opt/ls/llama_cpp/lib PYTHONPATH=/opt/ls:$PWD
#   bash bench/gpu_mtp.sh            # LCPP=/opt/lcpp (default) is built with .gpu/device/build-tools.sh if missing
# Outputs (text + JSON) go to $OUT (default /tmp/out); copy them to docs/bench/.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=${M:-/tmp/m}; mkdir -p "$M"
V=.gpu/data/ggml-vocab-qwen35.gguf
LCPP=${LCPP:-/opt/lcpp}
LBIN=$LCPP/build/bin
if [ -x .gpu/lcpp-bin/llama-speculative-simple ]; then  # carried from an earlier run (gpu_spec.sh KEEP_TOOLS=1)
  LBIN=$PWD/.gpu/lcpp-bin; chmod +x $LBIN/* 2>/dev/null; BUILD_LCPP=0
fi
TOKENS=${TOKENS:-256}; KS=${KS:-2,4,8}; DRAFT_MAX=${DRAFT_MAX:-8,16}; REPEAT=${REPEAT:-2}
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=${PYTHONPATH:-}:/tmp/site; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# build llama.cpp's tools in the background while the models are written (~5.5 min on 16 cores)
if [ ! -x "$LBIN/llama-speculative-simple" ] && [ "${BUILD_LCPP:-1}" = 1 ]; then
  (bash .gpu/device/build-tools.sh "$LCPP" > "$OUT/build-tools.txt" 2>&1) & BUILD_PID=$!
fi
t=$(date +%s)
# target: 48 DeltaNet + 16 attention layers, 5120 wide, FFN 17408, zero Q4_K layers (a bigram model at
# the real cost) + an MTP block that predicts what the target will predict next; its embedding/head
# rows are a 1024-wide draft's rows, zero-padded, so the Qwen3.5-0.8B-shaped hybrid draft below
# (bench/synth_qwen35.py, same head seed) computes the same function: a near-perfect draft model
[ -f $M/mtp27b.gguf ] || python3 bench/synth_qwen35_mtp.py $M/mtp27b.gguf --vocab $V --draft-width 1024
# the same target with a random MTP block: a head that disagrees
[ -f $M/mtp27b-bad.gguf ] || python3 bench/synth_qwen35_mtp.py $M/mtp27b-bad.gguf --vocab $V --draft-width 1024 --mtp-seed 3
[ -f $M/hdraft.gguf ] || python3 bench/synth_qwen35.py $M/hdraft.gguf --vocab $V --shape draft-0.8b
echo "models written in $(( $(date +%s) - t ))s"; ls -la $M | tee "$OUT/models.txt"
cat $M/mtp27b.gguf $M/mtp27b-bad.gguf $M/hdraft.gguf > /dev/null  # read once so loads are not disk-bound
python3 bench/spec_bench.py --target $M/mtp27b.gguf --draft mtp=mtp --draft draft-0.8b=$M/hdraft.gguf --draft ngram=ngram \
  --tokens $TOKENS --ks $KS --draft-max $DRAFT_MAX --repeat $REPEAT --profile --json-out "$OUT/mtp_bench.json" \
  2>&1 | tee "$OUT/mtp_bench.txt"
python3 bench/spec_bench.py --target $M/mtp27b-bad.gguf --draft mtp-bad=mtp --tokens $TOKENS --ks 4 \
  --draft-max 16 --repeat ${REPEAT_BAD:-$REPEAT} --json-out "$OUT/mtp_bad_bench.json" 2>&1 | tee "$OUT/mtp_bad_bench.txt"
# llama.cpp's C++ loop on the same files
[ -n "${BUILD_PID:-}" ] && wait $BUILD_PID
if [ -x "$LBIN/llama-speculative-simple" ]; then
  export LD_LIBRARY_PATH=$LBIN:${LD_LIBRARY_PATH:-}
  P="Write a detailed explanation of how speculative decoding works in large language models, with an example in Python code and a discussion of acceptance rates."
  for n in ${LCPP_DRAFT:-4 8}; do
    echo "== llama-speculative-simple draft-mtp --draft-max $n" | tee -a "$OUT/lcpp_mtp.txt"
    "$LBIN/llama-speculative-simple" -m $M/mtp27b.gguf --spec-type draft-mtp --spec-draft-n-max $n --spec-draft-p-min 0 -n $TOKENS \
      -p "$P" -ngl 99 -fa on --temp 0 -c 4096 2>&1 | tee "$OUT/lcpp_mtp_$n.log" | grep -E "decoded|n_draft|n_predict|n_drafted|n_accept|accept|error|failed" \
      | tee -a "$OUT/lcpp_mtp.txt"
  done
  echo "== llama-bench (plain decode of the same target)" | tee -a "$OUT/lcpp_mtp.txt"
  "$LBIN/llama-bench" -m $M/mtp27b.gguf -p 0 -n $TOKENS -fa 1 -ngl 99 2>&1 | tail -4 | tee -a "$OUT/lcpp_mtp.txt"
else
  echo "llama.cpp tools not available in $LCPP (see $OUT/build-tools.txt)" | tee "$OUT/lcpp_mtp.txt"
fi
