#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and torch, timm and the core dependencies already installed:
#   bash bench/gpu.sh [OUTDIR]
# 1. pytest -m gpu: training with bf16 and channels-last through `i2v train`, resume, DDP with SyncBatchNorm,
#    evaluate/export/tag/show with --device cuda, the Tagger on the GPU against the CPU.
# 2. python -m bench train --gpu: images/s of i2v_small (real loader vs batches in memory), the seed's i2v_vgg16
#    at 256 px and i2v_convnext_base at 448 px, bf16 and channels-last.
# 3. python -m bench tag --device cuda: `i2v tag` end to end vs the forward pass and vs one image at a time.
# 4. python -m bench serve --device cuda: dynamic batching vs one request per forward pass.
# Each step has its own time limit (STEP_TIMEOUT, default 240 s); a log per step goes to OUTDIR.
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)" |
    tee -a "$out/gpu.txt"

step() {
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "${STEP_TIMEOUT:-240}" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-25}" "$out/$name.log"
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
}

step tests $py -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider --durations=0
step train $py -m bench train --gpu --posts 1000 --batches 30 --batch-size 64
step tag $py -m bench tag --device cuda --arch i2v_vit_base --images 192 --batch-size 32 --repeat 2
step serve $py -m bench serve --device cuda --seconds 15
