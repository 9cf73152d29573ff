#!/usr/bin/env bash
# The GPU check: the CUDA tests, a 50-step stage-1 + stage-2 run on the GPU (bf16, every loss,
# the medium tier) and the GPU rows of the benchmarks, written to one results file. About 6
# minutes on one GPU; only the last two steps (the cost of a node replacement of an elastic run, and
# batch restoration on Ray Data, each on a local Ray with a SQLite tracking store) need Ray.
#
# Install first, on a machine with an NVIDIA driver (CUDA build of the pinned torch, then the project):
#   pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128
#   pip install -e '.[test]'
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out FILE]
#
# --dry-run runs every step on the CPU with tiny sizes and only checks the benchmarks start: it
# tests this script where there is no GPU (CI runs it). Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
out=runs/gpu_check/results.txt
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out="$2"; shift ;;
    *) echo "usage: $0 [--dry-run] [--out FILE]" >&2; exit 2 ;;
  esac
  shift
done
python=${PYTHON:-python}
mkdir -p "$(dirname "$out")"
: > "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME COMMAND...: run, append its output to the results file, remember a failure
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$out"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$out"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

{
  echo "GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  $python -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} 2>&1 | tee -a "$out"

if [ "$dry_run" -eq 1 ]; then
  # Without a GPU the cuda-marked tests are skipped: the selection itself must still work.
  step "CUDA tests (selection only)" $python -m pytest -q -m cuda tests/test_device_audit.py tests/test_degrade.py tests/test_eval.py
  step "stage 1 + stage 2 smoke run (CPU)" $python benchmarks/gpu_smoke.py --device cpu --steps 2
  for bench in bench_degrade bench_models bench_train bench_elastic bench_restore bf16_losses; do
    step "$bench starts" $python "benchmarks/$bench.py" --help
  done
else
  $python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "no CUDA device: use --dry-run on a machine without a GPU" | tee -a "$out"; exit 1; }
  step "CUDA tests" $python -m pytest -q -m cuda tests/test_device_audit.py tests/test_degrade.py tests/test_eval.py
  step "stage 1 + stage 2, 50 steps, bf16" $python benchmarks/gpu_smoke.py --device cuda --steps 50
  step "degradation engine on the GPU" $python benchmarks/bench_degrade.py --device cuda
  step "models on the GPU" $python benchmarks/bench_models.py --device cuda
  step "stage-2 training step on the GPU" $python benchmarks/bench_train.py --gpu
  step "L_dpl / L_clip in bf16 against fp32, paper ETB profile, 3 stage-2 steps" $python benchmarks/bf16_losses.py --device cuda
  # needs Ray, DeepSpeed and MLflow installed (pip install -e '.[test]')
  step "node replacement of an elastic run on the GPU" $python benchmarks/bench_elastic.py --gpu --steps 200
  # needs Ray and MLflow too: an untrained tiny-profile restorer, registered in a temporary SQLite store
  step "batch restoration on the GPU (Ray Data, 1 actor)" $python benchmarks/bench_restore.py --gpu --model untrained \
    --images 64 --size 512 --actors 1
fi

if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}" | tee -a "$out"
  exit 1
fi
echo "all steps passed; results in $out" | tee -a "$out"
