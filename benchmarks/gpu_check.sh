#!/usr/bin/env bash
# The GPU check (issue 6), one script for a machine with an NVIDIA GPU, within 10 minutes:
#   1. the test suite, whose backend-parity tests run every op and every adapter method on CuPy against NumPy;
#   2. LoRA and QLoRA training steps at medium size and on a 0.5B llama-shaped random model, minipeft on CuPy
#      against PEFT (+ bitsandbytes for QLoRA) on the same GPU;
#   3. a short table, last.
# On a CPU machine, `MINIPEFT_BACKEND=numpy benchmarks/gpu_check.sh` runs the same steps on the CPU at tiny size
# (this is how the script is checked where no GPU is lent).
#
#     benchmarks/gpu_check.sh                          # on the GPU machine
#     MINIPEFT_BACKEND=numpy benchmarks/gpu_check.sh   # the CPU dry run
set -uo pipefail
cd "$(dirname "$0")/.."
export MINIPEFT_BACKEND="${MINIPEFT_BACKEND:-cupy}"
if [ "$MINIPEFT_BACKEND" = cupy ]; then DEVICE=cuda; SIZES="medium 0.5b"; else DEVICE=cpu; SIZES="tiny"; fi
OUT="${OUT:-$(mktemp -d)}"
echo "== gpu_check: backend $MINIPEFT_BACKEND, device $DEVICE, sizes $SIZES, results in $OUT"
python -c "import minipeft, sys; print('minipeft backend:', minipeft.get_backend())" || exit 1

echo "== 1. the test suite; its backend-parity tests (the any_backend fixture, tests/test_array_api_guard.py)"
echo "      run every op and every adapter method on CuPy when a GPU answers, and compare with NumPy"
MINIPEFT_BACKEND=numpy timeout 300 python -m pytest -q -o addopts="-n 8 --dist loadfile" -p no:cacheprovider \
    2>&1 | tail -12
TESTS=${PIPESTATUS[0]}
echo "-- the CuPy cases alone (skipped, with the reason, where no GPU answers):"
MINIPEFT_BACKEND=numpy timeout 120 python -m pytest -q -o addopts="" -p no:cacheprovider -rs -k cupy \
    tests/test_array_api_guard.py tests/test_autograd.py tests/test_backend.py 2>&1 | tail -4

echo "== 2. training steps"
for size in $SIZES; do
  repeats=5; [ "$size" = 0.5b ] && repeats=3
  timeout 200 python benchmarks/bench_step.py --size "$size" --cases lora qlora --device "$DEVICE" \
      --repeats "$repeats" --json "$OUT/step-$size.json" 2>&1 | tail -4
done

echo "== 3. table (tests exit code $TESTS)"
python - "$OUT" <<'PY'
import glob, json, os, sys
print(f"{'case':22} {'minipeft s':>10} {'reference s':>11} {'ratio':>6} {'minipeft MB':>11} {'ref MB':>7}")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "step-*.json"))):
    data = json.load(open(path))
    for r in data["rows"]:
        print(f"{data['size'] + ' ' + r['case']:22} {r['minipeft_seconds']:10.4f} {r['torch_seconds']:11.4f} "
              f"{r['ratio']:6.2f} {r['minipeft_peak_rss_mb']:11.0f} {r['torch_peak_rss_mb']:7.0f}")
PY
exit "$TESTS"
