#!/usr/bin/env bash
# One prepared GPU check: installs nothing the environment already has, then prints the tables the
# README quotes, with the card's name. PARTS picks what runs; the default ("seed train") fits in
# about 7 minutes of GPU time (with room for a retry in 15):
#   seed:     the README's seed command itself, end to end, as a user types it (nano preset, 512²,
#             5,000 steps, 5 validations, --compile; stand-in encoders and the synthetic set, since
#             that machine has no Hub), under a wall-clock limit (SEED_LIMIT seconds, default 240),
#             and its phase table (timings.json: data, model, first step, training, validations,
#             checkpoints, export) against the goals;
#   train:    bench_train at 512² (64² latents), batch 8: the bare step eager / compiled / with a host
#             sync, and the trainer's own step eager and compiled, each with steps/s, MFU, GPU busy %;
#   validate: bench_validate: one full validation (100 images at 512², 50 steps), eager and compiled;
#   extra:    bench_memory (the CPU-side prediction, beside bench_train's measured peak), the
#             dual-CFG step, the diffusers caches, the tests that need CUDA, the largest batch in 4
#             and 8 GiB.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR] [PARTS]   (each table also lands in OUT_DIR, default
# gpu_check/)
#
# A GPU machine with no network (PyTorch, transformers, accelerate present; the rest not): on a
# machine with pip access, put the missing pure-Python wheels and this project's own in .whl/,
#   pip download --no-deps --only-binary=:all: -d .whl diffusers lpips webdataset braceexpand importlib_metadata stlpips-pytorch
#   pip wheel --no-deps -w .whl .
# and bring .whl/ along: they are installed from there, offline, into a scratch folder.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
parts="${2:-seed train}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if ! "$py" -c "import nano_dit.pipelines, lpips, webdataset, importlib.util as u; assert u.find_spec('stlpips_pytorch')" 2>/dev/null; then
  if [ -d .whl ]; then
    "$py" -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/nano_dit_site .whl/*.whl
    export PYTHONPATH="/tmp/nano_dit_site${PYTHONPATH:+:$PYTHONPATH}"
  else
    "$py" -m pip install -q -e ".[dev]"
  fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1  # rows survive a timeout
run() {  # run NAME CMD...: print and keep its table; a failing bench does not hide the others
  local name="$1"; shift
  echo "## $name: $*"
  { "$@" 2>&1 || echo "($name failed with status $?)"; } | grep -v -e "^W[0-9]" -e "^  warnings.warn" | tee "$out/$name.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "(no nvidia-smi)"; } | tee "$out/gpu.txt"
"$py" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)" | tee -a "$out/gpu.txt"
if [[ " $parts " == *" seed "* ]]; then
  # The README's seed command, as typed (plus the offline machine's stand-ins and a fresh run folder).
  run seed_run timeout "${SEED_LIMIT:-240}" "$py" -m accelerate.commands.launch --config_file accelerate_config.yaml \
    train_nano_dit.py --preset nano --compile --stand-in-encoders data/encoders/tiny --synth-if-missing \
    --output-dir "$out/seed_run" --overwrite-output-dir
  "$py" - "$out/seed_run" <<'PY' | tee "$out/seed_phases.md"
import sys
from nano_dit.timings import read_timings, timings_table

t = read_timings(sys.argv[1])
if t is None:
    sys.exit("(no timings.json: the run did not get far)")
print("\n".join(timings_table(t)))
data = sum(s for name, s in t["phases"].items() if name.startswith("data"))
rate = t["training"].get("steps_per_s", 0.0)
vals = [v["seconds"] for v in t["validations"]]
print("\n| phase | measured | goal |\n| --- | ---: | ---: |")
print(f"| data (synthesise + encode) | {data:.1f} s | <= 20 s cold, <= 3 s cached |")
print(f"| training | {rate:.1f} steps/s | >= 60 steps/s |")
if vals:
    later = f"{max(vals[1:]):.1f} s" if len(vals) > 1 else "–"
    print(f"| validation, first / later (worst) | {vals[0]:.1f} s / {later} | <= 30 s / <= 10 s |")
print(f"| whole run | {t['total_seconds']:.0f} s | <= 180 s |")
PY
fi
if [[ " $parts " == *" train "* ]]; then
  run bench_train timeout 120 "$py" benchmarks/bench_train.py --device cuda --latent-size 64 --batch-sizes 8 --compile --trainer
fi
if [[ " $parts " == *" validate "* ]]; then
  run bench_validate timeout 150 "$py" benchmarks/bench_validate.py --device cuda --compile
fi
if [[ " $parts " == *" extra "* ]]; then
  run bench_train_fit timeout 120 "$py" benchmarks/bench_train.py --device cuda --latent-size 64 --batch-sizes 8 --unfused --fit-gb 4 8
  run bench_memory timeout 45 "$py" benchmarks/bench_memory.py --batch-sizes 8 16
  run bench_pipeline_cfg timeout 30 "$py" benchmarks/bench_pipeline_cfg.py --device cuda --latent-size 64 --batch-size 4 --repeats 5
  run bench_sampling_cache timeout 150 "$py" benchmarks/bench_sampling_cache.py --device cuda --latent-size 64 --repeats 3 --compile
  run gpu_tests timeout 45 bash -c "cd tests && $py -m pytest -q -p no:cacheprovider test_cached_batches.py"
fi
"$py" - "$out" <<'PY'
import re, sys
from pathlib import Path

out = Path(sys.argv[1])
def rows(name):
    text = (out / f"{name}.txt").read_text() if (out / f"{name}.txt").exists() else ""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
steps = {r[0].split(" (")[0]: float(r[2]) for r in rows("bench_train") if len(r) > 2 and r[1] == "8" and re.match(r"[\d.]+$", r[2])}
val = {r[0]: float(r[2]) for r in rows("bench_validate") if len(r) > 2 and r[1] == "warm"}
for mode, sampling in (("trainer", "eager"), ("trainer, compiled", "compiled")):
    if mode in steps and sampling in val:
        total = 5000 / steps[mode] + 5 * val[sampling]
        print(f"seed run projected, {mode}: 5,000 steps at {steps[mode]:.1f} steps/s = {5000 / steps[mode]:.0f} s"
              f" + 5 validations x {val[sampling]:.1f} s = {total / 60:.1f} min (target <= 3 min on one H100)")
PY
