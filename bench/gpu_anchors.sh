#!/bin/bash
# The second H200 call of a benchmark session: what the first (bench/gpu_spec.sh PARTS="tools hybrid"
# + bench/gpu_mtp.sh) did not cover, in order of importance, packing results after each part:
#   1. the TUI next to `beechat ask` on the dense 27B-shaped pair (bench/gpu_tui.sh)
#   2. llama.cpp's C++ loop on the hybrid pair and on the MTP target (same files as the first call,
#      written again: each call starts on a bare machine)
#   3. beechat's loop on the dense pair (bench/spec_bench.py), then the C++ loop on it
# Needs llama.cpp's tools in .gpu/lcpp-bin (gpu_spec.sh KEEP_TOOLS=1 brings them back).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RES=/tmp/res; mkdir -p $RES/tui
pack() { tar czf $OUT/results.tgz -C $RES .; }
M=/tmp/m; mkdir -p $M
V=.gpu/data/ggml-vocab-qwen35.gguf
LBIN=$PWD/.gpu/lcpp-bin; chmod +x $LBIN/*; export LD_LIBRARY_PATH=$LBIN:${LD_LIBRARY_PATH:-}
TOKENS=${TOKENS:-256}
PROMPT="Write a detailed explanation of how speculative decoding works in large language models, with an example in Python code and a discussion of acceptance rates."
cpp() {  # NAME TYPE TARGET DRAFT-or-"" N...
  local name=$1 type=$2 t=$3 d=$4; shift 4
  for n in "$@"; do
    $LBIN/llama-speculative-simple -m $t ${d:+-md $d -ngld 99} --spec-type $type -ngl 99 -c 4096 -fa on -n $TOKENS \
      --temp 0 --spec-draft-n-max $n --spec-draft-p-min 0 -p "$PROMPT" > $RES/cpp_${name}_$n.log 2>&1
    echo "== C++ $name $type n_max=$n: $(grep -E 'decoded' $RES/cpp_${name}_$n.log | tail -1) $(grep -E '^.*accept +=' $RES/cpp_${name}_$n.log | tail -1)"
  done
}
t=$(date +%s)
OUT=$RES/tui TOKENS=512 TURNS=${TURNS:-3} bash bench/gpu_tui.sh > $RES/tui.log 2>&1
grep -vE "ggml_cuda_init|Device 0" $RES/tui.log | tail -12; pack
python3 bench/synth_qwen35.py $M/hybrid.gguf --vocab $V --draft-width 1024
python3 bench/synth_qwen35.py $M/hdraft.gguf --vocab $V --shape draft-0.8b
cpp hybrid draft-simple $M/hybrid.gguf $M/hdraft.gguf ${CPP_NMAX:-4 8 16 32}; pack
rm -f $M/hybrid.gguf
python3 bench/synth_qwen35_mtp.py $M/mtp27b.gguf --vocab $V --draft-width 1024
cpp mtp draft-mtp $M/mtp27b.gguf "" ${MTP_NMAX:-2 4 8}; pack
rm -f $M/mtp27b.gguf
python3 bench/spec_bench.py --target $M/target.gguf --draft good=$M/good.gguf --tokens $TOKENS --ks 4,8,16 \
  --draft-max 16,32 --repeat ${REPEAT:-2} --profile --json-out $RES/spec_bench_dense.json > $RES/spec_bench_dense.txt 2>&1
grep -A8 "== draft" $RES/spec_bench_dense.txt; pack
cpp dense draft-simple $M/target.gguf $M/good.gguf 4 16; pack
echo "done in $(( $(date +%s) - t ))s"
