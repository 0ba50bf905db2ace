#!/usr/bin/env bash
# Run the notebooks' GPU cells (`#| cuda`, `#| multigpu`) on a machine with GPUs, and keep the logs.
#
#   tools/gpu_test.sh wheels             # where PyPI is reachable: download into .whl/ the wheels listed in
#                                        #   tools/gpu_wheels.txt (for a GPU machine that reaches no registry)
#   tools/gpu_test.sh [NOTEBOOK ...]     # on the GPU machine, from the repo root: install, then run
#                                        #   nbdev_test --flags "cuda multigpu" on each notebook
#   tools/gpu_test.sh --execute [NB ...] # same, but execute the notebooks in place (tools/run_nb.py) so
#                                        #   their GPU cells get fresh outputs; copies land in the log folder
#
# With no notebook named, every notebook in nbs/ that has a cuda or multigpu cell runs.
# Environment: LOG_DIR (default gpu_logs/DATE), FLAGS (default "cuda multigpu"), PYTHON (default python3).
# The last line printed is `gpu notebooks: N passed, M failed`; the exit status is non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
FLAGS=${FLAGS:-cuda multigpu}

if [ "${1:-}" = wheels ]; then
  mkdir -p .whl
  grep -v '^#' tools/gpu_wheels.txt | grep . | while read -r req; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$req" || { echo "could not download $req"; exit 1; }
  done
  du -sh .whl; exit 0
fi

EXECUTE=0
if [ "${1:-}" = --execute ]; then EXECUTE=1; shift; fi

# 1. install: wheels brought along (no network), else from the package index
SITE=/tmp/qlora_course_site
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "installing the wheels in .whl/ failed"; exit 1; }
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . >/dev/null 2>&1 \
    || echo "note: could not install qlora_course into $SITE; using the repo on PYTHONPATH"
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE/bin:$PATH"
else
  "$PYTHON" -m pip install -q -e ".[dev]" || { echo "pip install -e .[dev] failed"; exit 1; }
fi
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1

# 2. what we run on
LOG_DIR=${LOG_DIR:-gpu_logs/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$LOG_DIR"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PYTHON" -c "from qlora_course.core import env_markdown; print(env_markdown())" 2>&1; } | tee "$LOG_DIR/env.txt"

# 3. the notebooks
if [ $# -eq 0 ]; then
  set -- $(grep -lE '#\| *(cuda|multigpu)' nbs/*.ipynb)
fi
passed=0; failed=0
for nb in "$@"; do
  name=$(basename "$nb" .ipynb)
  start=$(date +%s)
  if [ $EXECUTE = 1 ]; then
    "$PYTHON" tools/run_nb.py "$nb" --flags "$FLAGS" >"$LOG_DIR/$name.log" 2>&1; rc=$?
    cp "$nb" "$LOG_DIR/"
  else
    "$PYTHON" -m nbdev.test --path "$nb" --flags "$FLAGS" --do_print >"$LOG_DIR/$name.log" 2>&1; rc=$?
  fi
  secs=$(( $(date +%s) - start ))
  if [ $rc = 0 ]; then passed=$((passed+1)); echo "PASS $nb (${secs}s)"; else failed=$((failed+1)); echo "FAIL $nb (${secs}s): see $LOG_DIR/$name.log"; tail -30 "$LOG_DIR/$name.log"; fi
done | tee "$LOG_DIR/summary.txt"
passed=$(grep -c '^PASS' "$LOG_DIR/summary.txt"); failed=$(grep -c '^FAIL' "$LOG_DIR/summary.txt")
echo "gpu notebooks: $passed passed, $failed failed" | tee -a "$LOG_DIR/summary.txt"
[ "$failed" = 0 ]
