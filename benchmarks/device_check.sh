#!/usr/bin/env bash
# One call on a GPU machine: build the extension in place, run the GPU tests, then each benchmark
# named as an argument (a script name and its flags, quoted); every log and result under $OUT.
# Device time is scarce, so one call does it all and a failing step does not stop the next.
#
#   bash benchmarks/device_check.sh                          # build + every GPU test
#   TESTS="tests/test_compiled.py tests/test_graph_stamps.py" bash benchmarks/device_check.sh \
#       "compiled_switch --profile" "compiled --methods stagetrace_layers,stagetrace_layers_every8 --reps 40"
#   TESTS=none bash benchmarks/device_check.sh "lead"        # benchmarks only
set -u
PY=${PYTHON:-/opt/torch/.venv/bin/python}
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

STAGETRACE_CUDA_ARCHS=${STAGETRACE_CUDA_ARCHS:-90} "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
    > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -20 "$OUT/build.log"; exit 1; }

if [ "${TESTS:-tests}" != none ]; then
    # shellcheck disable=SC2086  # TESTS is a list of paths
    "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs ${TESTS:-tests} > "$OUT/pytest-gpu.log" 2>&1
    echo "GPU tests (exit $?): $(tail -1 "$OUT/pytest-gpu.log")"
fi

for bench in "$@"; do
    name=${bench%% *}
    # shellcheck disable=SC2086  # the flags split as written
    timeout "${BENCH_TIMEOUT:-400}" "$PY" "benchmarks/$name.py" ${bench#"$name"} --out "$OUT" > "$OUT/$name.log" 2>&1
    echo "$name (exit $?): see $OUT/$name.log"
    tail -25 "$OUT/$name.log"
done
