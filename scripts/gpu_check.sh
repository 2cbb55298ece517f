#!/usr/bin/env bash
# Every GPU figure the README owes, on one GPU, into ONE JSON file: the `gpu`-marked tests (gpu_tests.py), mask
# selection (bench_mask), the `erasure sd` step vs the reference (bench_sd), sampling (bench_sample), fast
# classifier training (bench_classifier), the DDPM (bench_ddpm) and the attacks' unit costs (bench_attack),
# each one's JSON line under its name, plus the device. A bench that fails or runs past its time slot is
# recorded with its error and the others still run; the script then exits 1. $OUT receives two files only
# (the device tool brings back at most 8); each bench's own output stays in a scratch folder.
#
#   scripts/gpu_check.sh                    # on the GPU machine: writes $OUT/gpu_check.json, logs to $OUT/log
#   scripts/gpu_check.sh --only sd,ddpm     # just these (to rerun the ones that failed)
#   scripts/gpu_check.sh --dry-run          # CPU: every bench at its smallest size, for CI
#
# On the device machine diffusers and nudenet are missing: download their wheels here into the ignored .whl/
# (see /work/.library/device/README.md) and carry .whl; they are installed with `pip install --target`.
# bench_classifier reads CIFAR-10 from $ERASURE_DATA_DIR (default shared/data in the checkout): copy
# cifar10_jpeg.npz into an ignored folder, carry it and point $ERASURE_DATA_DIR there.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu only=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) mode=dry; shift ;;
    --only) only=",${2:?--only takes names, e.g. --only sd,ddpm},"; shift 2 ;;
    *) echo "usage: scripts/gpu_check.sh [--dry-run] [--only NAME,...]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
[ -z "${ERASURE_DATA_DIR:-}" ] && [ -d shared/data ] && export ERASURE_DATA_DIR="$PWD/shared/data"
exec > >(tee "$OUT/log") 2>&1

if ! "$PYTHON" -c "import diffusers, nudenet" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_check: diffusers/nudenet are not installed and .whl/ holds no wheels; carry them (see header)"; exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 2
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# name, seconds allowed, arguments: GPU sizes and the dry run's smallest sizes. The GPU slots sum to 15 minutes
# (on an H200, 2026-12-04, the benches took about 8, the tests 46 s before the FSDP2 mask-pass test joined them);
# one call of the device tool runs 10 at most, so run it as two: --only tests,mask,sd,sample (3.8 minutes there,
# the wheels' install included), then --only classifier,ddpm,attack.
if [ "$mode" = gpu ]; then
  benches=(
    "tests 120 scripts/gpu_tests.py"
    "mask 60 scripts/bench_mask.py"
    "sd 150 scripts/bench_sd.py --size sd --batch-size 4 --steps 3 --warmup 1 --gen-images 8 --gen-steps 50"
    "sample 90 scripts/bench_sample.py --size sd --steps 50 --n 8"
    "classifier 180 scripts/bench_classifier.py --config configs/classifier_cifar10_train.yaml --no-baseline"
    "ddpm 150 scripts/bench_ddpm.py --preset fast --batch 1000 --train-batch 128"
    "attack 150 scripts/bench_attack.py --size sd --dtype fp32"
  )
else
  benches=(
    "tests 90 scripts/gpu_tests.py"
    "mask 60 scripts/bench_mask.py --numel 100000 --device cpu --repeats 1"
    "sd 120 scripts/bench_sd.py --size tiny --batch-size 1 --steps 1 --warmup 0 --gen-images 1 --gen-steps 1"
    "sample 60 scripts/bench_sample.py --size tiny --height 32 --steps 1 --n 1 --warmup 0 --device cpu"
    "classifier 120 scripts/bench_classifier.py --config configs/classifier_cifar10_cpu_train.yaml --subset 256
     --epochs 1 --workers 0"
    "ddpm 60 scripts/bench_ddpm.py --preset tiny --resolution 8 --batch 2 --steps 1 --train-batch 2
     --train-repeats 1 --device cpu"
    "attack 60 scripts/bench_attack.py --size tiny --steps 1 --resolution 32 --repeats 1 --device cpu"
  )
fi

names=()
for bench in "${benches[@]}"; do
  read -r -d "" -a words <<<"$bench"
  name=${words[0]} seconds=${words[1]}
  [ -n "$only" ] && [[ "$only" != *",$name,"* ]] && continue
  names+=("$name")
  echo "== $name (at most ${seconds}s): ${words[*]:2}"
  timeout "$seconds" "$PYTHON" "${words[@]:2}" >"$work/$name.out" 2>"$work/$name.err"
  echo "$?" >"$work/$name.rc"
  tail -n 3 "$work/$name.err"; tail -n 1 "$work/$name.out"
done

[ ${#names[@]} -gt 0 ] || { echo "gpu_check: --only names no bench" >&2; exit 2; }
"$PYTHON" - "$OUT" "$work" "$mode" "${names[@]}" <<'PY'
"""Collect each bench's last stdout line (its JSON) and the device into gpu_check.json; exit 1 if any failed."""
import json
import platform
import sys
from pathlib import Path

import torch

out, work, mode, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
benches, failed = {}, []
for name in names:
    rc = int((work / f"{name}.rc").read_text())
    lines = (work / f"{name}.out").read_text().strip().splitlines()
    try:
        benches[name] = json.loads(lines[-1]) if rc == 0 and lines else None
    except json.JSONDecodeError:
        benches[name] = None
    if benches[name] is None:
        error = (work / f"{name}.err").read_text().strip().splitlines()
        benches[name] = {"error": "timed out" if rc == 124 else (error[-1] if error else f"exit status {rc}")}
        failed.append(name)
cuda = torch.cuda.is_available()
device = {"mode": mode, "torch": torch.__version__, "python": platform.python_version(),
          "gpu": torch.cuda.get_device_name() if cuda else None,
          "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
          "cuda": torch.version.cuda}
(out / "gpu_check.json").write_text(json.dumps({"device": device, "benches": benches}, indent=1) + "\n")
print(f"gpu_check: {out / 'gpu_check.json'}: {len(names) - len(failed)} of {len(names)} benches ran"
      + (f"; failed: {', '.join(failed)}" if failed else ""))
sys.exit(1 if failed else 0)
PY
