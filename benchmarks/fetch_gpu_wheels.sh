#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that benchmarks/run_gpu.sh installs on the GPU machine.
#
# The accelerator machine reaches no package index. Its image has torch, triton, accelerate, peft, safetensors,
# tokenizers, huggingface-hub, pyarrow, psutil and pyyaml, but not trl, datasets or bitsandbytes, and an older
# transformers than yulan_tune needs; these travel as wheels in .whl/ (ignored by git: `echo /.whl/ >>
# .git/info/exclude`), named in the device call's `carry`. Versions: the ones the CPU test suite runs with
# (docs/stack_notes.md), so GPU and CPU rows are measured on the same libraries. Python 3.12 / x86-64 is the device
# image's interpreter.
#
#   bash benchmarks/fetch_gpu_wheels.sh           # -> .whl/*.whl (about 55 MiB with bitsandbytes)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DEST"
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$DEST" "$@"
}
download transformers==5.24.0 trl==1.16.0 datasets==5.2.0 peft==0.21.2 dill==0.4.1 multiprocess==0.70.19 \
  bitsandbytes==0.50.2
# optional speed-ups the recipes use when importable (pure Python on top of the image's triton)
download liger-kernel==0.8.5 || echo "liger-kernel not downloaded: the GPU rows run without Liger kernels"
du -sh "$DEST"
