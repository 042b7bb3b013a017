#!/usr/bin/env bash
# One-command GPU check (issue 9): the cuda-marked tests, then scoring and one dimension end to end
# on the Llama-3.2-1B and Llama-3.1-8B shapes in bfloat16, with tokens/s per phase, peak GPU memory,
# seconds per dimension and the edit/publish time. Needs the project installed (README quick start).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--work DIR] [--out DIR]
#
# --dry-run: the same steps on the CPU with a 4-layer model (CI runs it): the CUDA tests are only
# collected, the benchmark runs in float32. Shapes are generated under --work (the 8B trio needs
# about 25 GB of disk); tables go to --out (default: benchmarks/results/gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
work="${TMPDIR:-/tmp}/fgsn-gpu-check"
out="benchmarks/results/gpu-check"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --work) work="$2"; shift ;;
        --out) out="$2"; shift ;;
        *) echo "usage: $0 [--dry-run] [--work DIR] [--out DIR]" >&2; exit 64 ;;
    esac
    shift
done
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)

if [ "$dry" = 1 ]; then
    echo "== dry run on the CPU"
    python -m pytest -q -m cuda --collect-only | tail -n 1
    python benchmarks/device_scoring.py --device cpu --dtype float32 --unit entry --budget 1 --entries \
        --prompts 8 --shapes smoke --work "$work" --out "$out/dry-run"
else
    if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "error: no CUDA device visible to torch (use --dry-run to check the script on a CPU)" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    echo "== cuda-marked tests"
    python -m pytest -q -m cuda
    echo "== Llama-3.2-1B shape: default setting (entries, 0.3 %, every layer)"
    python benchmarks/device_scoring.py --device cuda --dtype bfloat16 --unit entry --budget 0.3 --entries \
        --prompts 32 --shapes llama-3.2-1b --work "$work" --out "$out/llama-3.2-1b"
    echo "== Llama-3.1-8B shape: entries, 0.3 %, band layers (per-entry accumulators for every layer"
    echo "   would need 4 bytes per scored parameter on the device and three float32 copies on the host)"
    python benchmarks/device_scoring.py --device cuda --dtype bfloat16 --unit entry --budget 0.3 --scope band \
        --entries --prompts 32 --shapes llama-3.1-8b --work "$work" --out "$out/llama-3.1-8b"
fi
echo "== done in $(( $(date +%s) - start )) s"
