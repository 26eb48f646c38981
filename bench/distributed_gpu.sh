#!/usr/bin/env bash
# One GPU: a single process (OneDevice('cuda')) against DDP with a world of one
# (graft launch --nproc-per-node 1: DataParallel on NCCL), same model, batch and steps.
# Takes about a minute (3 rounds x 2 configurations x 300 steps of a 256-2048-2048-10 MLP
# at batch 256, plus process start-up); a 280 s timeout keeps it under 5 minutes.
#
#   bash bench/distributed_gpu.sh            # table on stdout
#   OUT=results bash bench/distributed_gpu.sh   # also results/distributed_gpu.json
#
# Uses $PYTHON (default: python3), which needs a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"bench/distributed_gpu.sh needs a CUDA GPU; torch {torch.__version__} sees none")
import torch.distributed as dist
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, "
      f"NCCL {'available' if dist.is_nccl_available() else 'MISSING'}")
PY

json_args=()
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    json_args=(--json "$OUT/distributed_gpu.json")
fi
timeout 280 "$PYTHON" bench/distributed.py --gpu "${json_args[@]}" "$@"
