#!/usr/bin/env bash
# One device call of the single-GPU work (issue 13), from the repo root on the GPU machine, with `.peer/` (the peers' site and
# anchors.py, from ../shared/peer) and `.whl/` (nbdev, execnb and their pure-Python dependencies, for tools/run_nb.py) carried.
#   bash tools/perf/gpu_call.sh nb        # 12_fast's two #| cuda cells (GPU checks, then the benchmark), ~8 min
#   bash tools/perf/gpu_call.sh graphs    # which CUDA-graph configurations capture; graphs vs compiled layers in graphs, ~6 min
#   bash tools/perf/gpu_call.sh curves    # 50-step loss curves, plain vs fast vs fp32, tiny base and 8B, ~5 min
#   bash tools/perf/gpu_call.sh long_gc   # longest context in 24 GiB: ours vs Unsloth (plain checkpointing), ~9 min
#   bash tools/perf/gpu_call.sh long_off  # the same with offloaded checkpoints on both sides, ~9 min
# Results go to $OUT (the device tool brings them back); a phase never waits on a background job it cannot see end.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/peer && tar xzf .peer/peer_site.tgz -C /tmp/peer && rm -rf /tmp/peer/site/torchao*
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/peer/site:/tmp/site HF_HUB_OFFLINE=1 TQDM_DISABLE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1 \
       CKPT=/tmp/llama-8b-random BENCH_CKPT=/tmp/llama-8b-random
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
make_ckpt() { [ -f /tmp/llama-8b-random/config.json ] || python3 .peer/anchors.py make > "$OUT/make.log" 2>&1; }
case "${1:-nb}" in
  nb)
    make_ckpt
    mkdir -p "$OUT/tests" "$OUT/bench"
    timeout 150 python3 tools/run_nb.py nbs/12_fast.ipynb --flags cuda --only 59951741,1671a65e > "$OUT/tests/run.log" 2>&1
    rc=$?; echo "tests: exit $rc"; cp nbs/12_fast.ipynb "$OUT/tests/"
    if [ $rc -ne 0 ]; then   # the cell's assertion stopped the notebook, which keeps no output: the checks' own lines
      timeout 150 python3 tools/perf/test_fast_gpu.py > "$OUT/tests/test_fast_gpu.log" 2>&1; grep -E "^(PASS|FAIL)|passed|Error" "$OUT/tests/test_fast_gpu.log"
    fi
    timeout 430 python3 tools/run_nb.py nbs/12_fast.ipynb --flags cuda --only 59951741,5311a5aa > "$OUT/bench/run.log" 2>&1; echo "bench: exit $?"
    cp nbs/12_fast.ipynb "$OUT/bench/" ;;
  graphs)
    timeout 150 python3 tools/perf/debug_graphs.py 2>&1 | tail -30
    make_ckpt
    timeout 330 python3 tools/perf/bench_fast.py all --variants graphs,graphs_compiled,unsloth_gc --budget 320 --timeout 150 \
      2> "$OUT/bench_graphs.err" | tee "$OUT/bench_graphs.log" | tail -12 ;;
  curves)
    make_ckpt
    timeout 560 python3 tools/perf/loss_curves.py all --shapes tiny_base,llama-3-8b --budget 540 --plot "$OUT/loss_curves.png" \
      --out "$OUT/loss_curves.json" 2>&1 | tail -30 ;;
  long_gc)
    make_ckpt
    timeout 570 python3 tools/perf/long_context.py all --sides ours,unsloth_gc --budget 540 --out "$OUT/long_gc.json" 2>&1 | tail -20 ;;
  long_off)
    make_ckpt
    timeout 570 python3 tools/perf/long_context.py all --sides ours_offload,unsloth --budget 540 --out "$OUT/long_off.json" 2>&1 | tail -20 ;;
  *) echo "unknown phase $1"; exit 2 ;;
esac
