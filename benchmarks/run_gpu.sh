#!/usr/bin/env bash
# The whole benchmark picture in one GPU session (about 8 minutes on an H100):
#
#   bash benchmarks/fetch_wheels.sh          # here, once: lark into .whl/
#   device run, carry [".whl"]:  bash benchmarks/run_gpu.sh
#
# Installs the carried wheels, checks the GPU tests of the autotuner, warms
# the compile caches in parallel (untimed), then times the suite in priority
# order within its budget and writes benchmarks/results/bench-<device>-<date>.json
# (copied to $OUT as well when the device tool sets it). Extra arguments go to
# benchmarks/run.py (e.g. --cases conv --examples none).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
stamp=$(mktemp)

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/convdsl-site .whl/*.whl
    export PYTHONPATH=/tmp/convdsl-site:${PYTHONPATH:-}
fi
# convdsl from this checkout: grammar/ and kernels/ sit beside the package.
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
python3 -c "import lark, convdsl, torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, 'device', torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true

# The autotuner on a real GPU (a few seconds).
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_autotune.py || true

status=0
python3 benchmarks/run.py --warm "${WARM_WORKERS:-12}" --warm-budget "${WARM_BUDGET:-150}" \
    --budget "${BUDGET:-270}" "$@" 2>&1 | tee "${OUT:-/tmp}/bench-log.txt" || status=$?

# The results come back even when a check failed (status 1 says so).
if [ -n "${OUT:-}" ]; then
    find benchmarks/results -name '*.json' -newer "$stamp" -exec cp {} "$OUT"/ \;
fi
echo "run_gpu.sh: $(( $(date +%s) - started )) s, status $status"
exit "$status"
