#!/usr/bin/env bash
# One-GPU benchmark run, under 5 minutes on an H100-class card: Fisher estimation cost of a ~1.1B bf16 Llama
# (sequences of 512, batch 32 unless --batch-size says otherwise) against forward+backward, then the 0.5B merge
# benchmark. Prints the card name and writes JSON under $OUT (default benchmarks/results/gpu).
#
#   bash benchmarks/gpu.sh                      # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --device cpu --tiny  # smoke test of the same path on a CPU (tiny model and sizes)
#
# Exits non-zero as soon as a step fails, so a partial run is never mistaken for a result.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"  # PYTHON=path/to/venv/bin/python to choose
out="${OUT:-$here/results/gpu}"
device=cuda
tiny=0
batch=32
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --tiny) tiny=1; shift ;;
    --batch-size) batch="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "unknown argument $1 (use --device, --tiny, --batch-size, --out)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"

"$python" - "$device" <<'EOF'
import sys, torch
device = sys.argv[1]
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible: run on a GPU machine, or pass --device cpu --tiny for a smoke test")
    print("card:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
else:
    print("device: cpu | torch", torch.__version__)
EOF

if [[ $tiny == 1 ]]; then
  model=tiny; length=64; batch=4; chunk=2; merge_size=small; repeats=1; iters=1
else
  # chunk 8: the LM head's per-example gradients of 8 examples (8 x 32000 x 2048 fp32) are 2 GiB at a time.
  model=1b; length=512; chunk=8; repeats=3; iters=2; merge_size=0.5b
fi

start=$SECONDS
# bf16 only on the GPU: that is how a 1B model is estimated there; fp32 would double the time for no insight.
"$python" "$here/fisher_cost.py" --model "$model" --device "$device" --dtypes bfloat16 \
  --batch-size "$batch" --length "$length" --repeats "$repeats" --iters "$iters" --chunk-size "$chunk" \
  --json "$out/fisher_cost.json"
echo "estimation benchmark: $((SECONDS - start)) s"

start=$SECONDS
workdir="${WORKDIR:-${TMPDIR:-/tmp}/fishmerge-bench}"
"$python" "$here/merge_io.py" --workdir "$workdir" --sizes "$merge_size" --repeats "$repeats" \
  --cache "${CACHE:-warm}" --mergekit "${MERGEKIT:-none}" --json "$out/merge_io.json" --clean
echo "merge benchmark: $((SECONDS - start)) s"
echo "results in $out"
