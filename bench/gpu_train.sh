#!/usr/bin/env bash
# The GPU training benchmark (the GPU preset's accuracy and time, compilation included),
# in two steps, because the GPU machine reaches no package index and sees only the repo:
#
#   1. here, in the repo root:   bash bench/gpu_train.sh stage
#      puts into .gpu/ (git-ignored) the three wheels Keras needs there (keras 3.15.1, namex,
#      optree for CPython 3.12; the machine has JAX 0.11, numpy, h5py, rich, ml-dtypes) and a
#      copy of the 44 MB training archive (transport only, never committed): ~47 MB in all,
#      under the device tool's 64 MiB.
#   2. the device tool's `run` with carry [".gpu"] and the command
#        bash bench/gpu_train.sh run
#      installs the wheels into a venv over the machine's Python and runs bench.bench_train --bare with
#      KERAS_BACKEND=jax on the airbench94 recipe, float32 then mixed_bfloat16; the logs go
#      to $OUT. Extra arguments after `run` go to both runs (e.g. --set epochs=12).
#      Expect ~2-3 minutes: prepare ~10 s, then per run backend start, compile, train, test.
#      The README's figure: bash bench/gpu_train.sh run --set val_fraction=0.02
set -euo pipefail
cd "$(dirname "$0")/.."

# The machine's Python (JAX, numpy) plus the staged wheels, in a venv that sees its packages;
# run from the repo root with -m, so `training` imports from this checkout.
gpu_venv() {
  python3 -m venv --system-site-packages /tmp/gpu-venv
  /tmp/gpu-venv/bin/python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .gpu/whl/*.whl
  PATH=/tmp/gpu-venv/bin:$PATH
}

case "${1:-}" in
stage)
  mkdir -p .gpu/whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/whl \
    keras==3.15.1 namex==0.1.0 optree==0.20.0
  cp "${ARCHIVE:-../shared/data/cifar10-train-jpeg.zip}" .gpu/cifar10-train-jpeg.zip
  du -sh .gpu .gpu/whl/*
  ;;
run)
  shift
  gpu_venv
  export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
  out="${OUT:-/tmp}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  python -c 'import jax, keras; print("jax", jax.__version__, "keras", keras.__version__, jax.devices())' \
    | tee -a "$out/gpu.txt"
  for mixed in false true; do
    python -m bench.bench_train --backend jax --bare --archive .gpu/cifar10-train-jpeg.zip \
      --recipe airbench94 --state /tmp/gpu-train-state --set mixed_precision=$mixed "$@" \
      2>&1 | tee "$out/airbench94_mixed_$mixed.log"
  done
  grep -h '^RESULT' "$out"/airbench94_mixed_*.log
  ;;
*)
  echo "usage: bash bench/gpu_train.sh stage  (here)  |  bash bench/gpu_train.sh run [args]  (on the GPU)" >&2
  exit 2
  ;;
esac
