#!/bin/bash
# H200 benchmarks of beechat's speculative loop beside llama.cpp's own C++ loop, same files, one run.
# Run through the device tool from the repo root (docs/benchmarks.md has the whole command):
#   bash .gpu/device/setup.sh /opt/ls >/dev/null; export LD_LIBRARY_PATH=/opt/ls/llama_cpp/lib PYTHONPATH=/opt/ls:$PWD
#   PARTS="tools hybrid dense" bash bench/gpu_spec.sh
# Knobs (environment): TOKENS, KS, DRAFT_MAX, REPEAT, VARIANTS (spec_bench --variants), EXTRA_DRAFTS
# (default "--draft ngram=ngram"; empty: none), USELESS_KS, USELESS_REPEAT, USELESS_VARIANTS, CPP_NMAX,
# DENSE_DRAFT_MAX, DENSE_VARIANTS.
# PARTS picks what runs:
#   tools   llama.cpp's llama-bench / llama-speculative-simple (carried in .gpu/lcpp-bin, else built
#           in the background from the vendored source: ~5.5 min)
#   hybrid  Qwen3.6-27B-shaped qwen35 target (64 layers: 48 DeltaNet + 16 attention, ~16 GiB) with
#           Qwen3.5-0.8B-shaped drafts: a near-perfect one and a useless one
#   dense   the dense 64-layer 27B-shaped target (qwen3) with 2-layer drafts
#   cost    bench/verify_cost.py on the hybrid pair (verify batch costs, snapshots vs host state)
#   draftstep  bench/draft_step.py on the hybrid draft, with and without CUDA graphs (+ llama-bench's
#           tg on it when the tools are there): what one draft token costs
#   switch  bench/switch_bench.py: the useless hybrid draft over a conversation (TURNS, default 6)
#           against a plain engine, the snapshot switch included
#   kv      KV cache type vs context depth
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# the device tool brings back at most 8 files: results go to $RES and are packed into $OUT/results.tgz
# after every part (so a run stopped at its time limit still returns what it had)
RES=/tmp/res; mkdir -p $RES
pack() { tar czf $OUT/results.tgz -C $RES .; }
M=/tmp/m; mkdir -p $M
V=.gpu/data/ggml-vocab-qwen35.gguf
PARTS=" ${PARTS:-tools hybrid dense} "
TOKENS=${TOKENS:-256}
has() { [[ "$PARTS" == *" $1 "* ]]; }
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=${PYTHONPATH:-}:/tmp/site; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $RES/gpu.txt
PROMPT="Write a detailed explanation of how speculative decoding works in large language models, with an example in Python code and a discussion of acceptance rates."

LBIN=""
if has tools; then
  if [ -x .gpu/lcpp-bin/llama-speculative-simple ]; then  # built by an earlier run (KEEP_TOOLS) from the same source
    LBIN=$PWD/.gpu/lcpp-bin; chmod +x $LBIN/* 2>/dev/null; export LD_LIBRARY_PATH=$LBIN:${LD_LIBRARY_PATH:-}
  else
    nice -n 19 bash .gpu/device/build-tools.sh /opt/lcpp > $RES/build-tools.txt 2>&1 &
    BUILD_PID=$!
    LBIN=/opt/lcpp/build/bin
  fi
fi
wait_tools() {
  [ -n "${BUILD_PID:-}" ] && { wait $BUILD_PID; tail -2 $RES/build-tools.txt; BUILD_PID=""; }
  [ -x $LBIN/llama-speculative-simple ]
}
# llama.cpp's C++ speculative loop on the same files: greedy, draft p-min 0 (never stops a draft early)
cpp_spec() {  # NAME TARGET DRAFT N_MAX...
  local name=$1 t=$2 d=$3; shift 3
  for n in "$@"; do
    local log=$RES/cpp_spec_${name}_$n.log r=2
    while [ -f $log ]; do log=$RES/cpp_spec_${name}_${n}_run$r.log; r=$((r + 1)); done  # CPP_NMAX may repeat an n
    echo "-- llama-speculative-simple $name n_max=$n ($(basename $log))"
    $LBIN/llama-speculative-simple -m $t -md $d -ngl 99 -ngld 99 -c 4096 -fa on -n $TOKENS --temp 0 \
      --spec-type draft-simple --spec-draft-n-max $n --spec-draft-p-min 0 -p "$PROMPT" > $log 2>&1
    grep -E "decoded|n_drafted|n_accept|accept " $log || tail -5 $log
  done
}

t=$(date +%s)
if has hybrid || has cost || has draftstep || has switch; then
  [ -f $M/hybrid.gguf ] || python3 bench/synth_qwen35.py $M/hybrid.gguf --vocab $V --draft-width 1024
  [ -f $M/hdraft.gguf ] || python3 bench/synth_qwen35.py $M/hdraft.gguf --vocab $V --shape draft-0.8b
  [ -f $M/huseless.gguf ] || python3 bench/synth_qwen35.py $M/huseless.gguf --vocab $V --shape draft-0.8b --head-seed 5
  cat $M/hybrid.gguf $M/hdraft.gguf $M/huseless.gguf > /dev/null
fi
if has cost; then
  python3 bench/verify_cost.py --model $M/hybrid.gguf --rs-seq 0,16 --sizes 1,2,4,8,12,16,17,24,32 \
    --json-out $RES/verify_cost_hybrid.json 2>&1 | tee $RES/verify_cost_hybrid.txt
  python3 bench/verify_cost.py --model $M/hdraft.gguf --rs-seq 0 --sizes 1,2,4,8,16 --branch \
    --json-out $RES/verify_cost_draft.json 2>&1 | tee $RES/verify_cost_draft.txt
  pack
fi
if has draftstep; then
  python3 bench/draft_step.py --model $M/hdraft.gguf --json-out $RES/draft_step.json 2>&1 | tee $RES/draft_step.txt
  GGML_CUDA_DISABLE_GRAPHS=1 python3 bench/draft_step.py --model $M/hdraft.gguf \
    --json-out $RES/draft_step_nographs.json 2>&1 | tee $RES/draft_step_nographs.txt
  pack
fi
if has switch; then
  python3 bench/switch_bench.py --target $M/hybrid.gguf --draft $M/huseless.gguf --turns ${TURNS:-6} \
    --max-tokens $TOKENS --draft-max ${DRAFT_MAX:-32} --json-out $RES/switch_bench.json 2>&1 | tee $RES/switch_bench.txt
  pack
fi
if has hybrid; then
  python3 bench/spec_bench.py --target $M/hybrid.gguf --draft good=$M/hdraft.gguf ${EXTRA_DRAFTS---draft ngram=ngram} \
    --tokens $TOKENS --ks ${KS:-4,8,16} --draft-max ${DRAFT_MAX:-16,32} --repeat ${REPEAT:-2} \
    --variants ${VARIANTS:-host,serial} --profile --json-out $RES/spec_bench_hybrid.json 2>&1 | tee $RES/spec_bench_hybrid.txt
  # a useless draft: fixed lengths only show how much a controller must save, one is enough
  python3 bench/spec_bench.py --target $M/hybrid.gguf --draft useless=$M/huseless.gguf \
    --tokens $TOKENS --ks ${USELESS_KS:-4} --draft-max ${DRAFT_MAX:-16,32} --repeat ${USELESS_REPEAT:-${REPEAT:-2}} \
    ${USELESS_VARIANTS:+--variants $USELESS_VARIANTS} \
    --profile --json-out $RES/spec_bench_hybrid_useless.json 2>&1 | tee $RES/spec_bench_hybrid_useless.txt
  pack
fi
if has dense; then
  S=.gpu/tools/synth_gguf.py
  [ -f $M/target.gguf ] || python3 $S $M/target.gguf --vocab $V
  [ -f $M/good.gguf ] || python3 $S $M/good.gguf --vocab $V --n-layer 2 --n-ff 2048 --n-head 8 --n-head-kv 2 --head-dim 128 --layer-seed 7
  [ -f $M/useless.gguf ] || python3 $S $M/useless.gguf --vocab $V --n-layer 2 --n-ff 2048 --n-head 8 --n-head-kv 2 --head-dim 128 --layer-seed 7 --head-seed 5
  cat $M/target.gguf $M/good.gguf $M/useless.gguf > /dev/null
  python3 bench/spec_bench.py --target $M/target.gguf --draft good=$M/good.gguf \
    --tokens $TOKENS --ks ${KS:-4,8,16} --draft-max ${DENSE_DRAFT_MAX:-${DRAFT_MAX:-16,32}} --repeat ${REPEAT:-2} \
    --variants ${DENSE_VARIANTS:-host,serial} --profile --json-out $RES/spec_bench_dense.json 2>&1 | tee $RES/spec_bench_dense.txt
  python3 bench/spec_bench.py --target $M/target.gguf --draft useless=$M/useless.gguf \
    --tokens $TOKENS --ks ${USELESS_KS:-4} --draft-max ${DENSE_DRAFT_MAX:-${DRAFT_MAX:-16,32}} --repeat ${USELESS_REPEAT:-${REPEAT:-2}} \
    --profile --json-out $RES/spec_bench_dense_useless.json 2>&1 | tee $RES/spec_bench_dense_useless.txt
  pack
fi
echo "beechat parts done in $(( $(date +%s) - t ))s"
if has tools && wait_tools; then
  if has draftstep; then
    $LBIN/llama-bench -m $M/hdraft.gguf -ngl 99 -fa 1 -p 0 -n 128 -r 3 2>&1 | tee $RES/llama_bench_draft.txt
  fi
  if has hybrid; then
    $LBIN/llama-bench -m $M/hybrid.gguf -ngl 99 -fa 1 -p 1,2,4,8,16,32 -n $TOKENS -r 2 2>&1 | tee $RES/llama_bench_hybrid.txt
    cpp_spec hybrid $M/hybrid.gguf $M/hdraft.gguf ${CPP_NMAX:-4 8 16}
    cpp_spec hybrid-useless $M/hybrid.gguf $M/huseless.gguf 4
  fi
  if has dense; then
    $LBIN/llama-bench -m $M/target.gguf -ngl 99 -fa 1 -p 1,16 -n $TOKENS -r 2 2>&1 | tee $RES/llama_bench_dense.txt
    cpp_spec dense $M/target.gguf $M/good.gguf ${CPP_NMAX:-4 8 16}
  fi
  pack
  if [ -n "${KEEP_TOOLS:-}" ]; then  # bring the binaries back to carry next time
    mkdir -p /tmp/keep; cp $LBIN/llama-bench $LBIN/llama-speculative-simple /tmp/keep/
    # libraries the binaries need beyond what setup.sh lays out in /opt/ls/llama_cpp/lib
    for lib in $(ldd $LBIN/llama-speculative-simple $LBIN/llama-bench | awk '/=>/ {print $3}' | grep /opt/lcpp | sort -u); do
      [ -f /opt/ls/llama_cpp/lib/$(basename $lib) ] || cp -L $lib /tmp/keep/
    done
    ldd $LBIN/llama-speculative-simple > $RES/ldd.txt; ls -la /tmp/keep >> $RES/ldd.txt
    tar czf $OUT/lcpp-bin.tgz -C /tmp/keep .
  fi
fi
if has kv; then
  [ -f $M/kv16.gguf ] || python3 .gpu/tools/synth_gguf.py $M/kv16.gguf --vocab $V --n-layer 16
  python3 bench/kv_depth.py --model $M/kv16.gguf --types f16,q8_0,q4_0 --depths ${DEPTHS:-0,32768,131072} \
    --json-out $RES/kv_depth.json 2>&1 | tee $RES/kv_depth.txt
fi
pack
echo "all done in $(( $(date +%s) - t ))s"
