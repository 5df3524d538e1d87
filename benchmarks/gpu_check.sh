#!/usr/bin/env bash
# `make gpu-check`, on a machine with one CUDA GPU: the GPU tests (tests/test_gpu.py: QLoRA with a paged optimizer,
# bf16 full fine-tune, LoRA DPO, flash-attention vs SDPA, Liger on/off, a yulanmini pretraining run, the FSDP config,
# DeepSpeed ZeRO-2 where installed), then every GPU benchmark (benchmarks/run_gpu.sh). Each step has a hard limit:
# 150 s of tests + 390 s of benchmarks + about 40 s of wheels and preflight, inside 10 minutes. The test counts and
# the benchmark rows are appended to benchmarks/RESULTS.md with the device name; the logs, the JUnit XML and
# RESULTS.md are copied to $OUT (the device tool brings $OUT back).
#
# The GPU machine reaches no package index: on a machine with PyPI access first `bash benchmarks/fetch_gpu_wheels.sh`
# (-> .whl/), then name `.whl` in the device call's `carry`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/yulan_bench_out}
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
START=$(date +%s)

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} YULAN_WHEELS_INSTALLED=1
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

echo "=== GPU tests (limit 150s)"
timeout --signal=INT --kill-after=15 150 "$PY" -m pytest tests/test_gpu.py -m gpu -q -rs -p no:cacheprovider \
  --junitxml "$OUT_DIR/gpu_tests.xml"
echo "=== GPU tests: exit $? after $(( $(date +%s) - START ))s"
"$PY" - "$OUT_DIR/gpu_tests.xml" <<'PYEOF' || echo "no test report to record"
import datetime, sys, xml.etree.ElementTree as ET
import torch
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None
          or case.find("error") is not None]
line = (f"| {datetime.date.today()} | {torch.cuda.get_device_name()} | tests/test_gpu.py | {counts['tests']} tests: "
        f"{counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']} passed, "
        f"{counts['failures'] + counts['errors']} failed {failed}, {counts['skipped']} skipped |\n")
with open("benchmarks/RESULTS.md", "a", encoding="utf-8") as results:
    results.write(line)
print(line, end="")
PYEOF

bash benchmarks/run_gpu.sh
echo "gpu-check: $(( $(date +%s) - START ))s in all; results in $OUT_DIR"
