#!/usr/bin/env bash
# Training speed of this tree against another checkout, side by side: bench/train_speed.py's
# variant (b) (`imgvae train` defaults; or VARIANT=a|a0|c), each tree's own bench script and
# package, alternating so that the shared machine's load falls on both alike. VARIANT=demo runs
# `make demo`'s training in each tree instead and prints its img/s and held-out PSNR.
#
#   git worktree add /tmp/base 3eb4167 && bench/ab_speed.sh /tmp/base        # 2 rounds
#   ROUNDS=3 VARIANT=c bench/ab_speed.sh /tmp/base
#   VARIANT=demo bench/ab_speed.sh /tmp/base
set -euo pipefail
old=$(cd "${1:?usage: bench/ab_speed.sh OLD_CHECKOUT}" && pwd)
new=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$new/.venv/bin/python}
corpus=${CORPUS:-/tmp/imgvae-ab-corpus}
if [ "${VARIANT:-b}" != demo ] && [ ! -d "$corpus" ]; then
  (cd "$new/bench" && "$python" -c "from data import write_corpus; from pathlib import Path; write_corpus(Path('$corpus'), 1280)")
fi
if [ "${VARIANT:-b}" = c ] && [ ! -d "$corpus-cache" ]; then  # as bench/train_speed.py prepares it
  PYTHONPATH="$new/src" "$python" -c "from imgvae.data.cache import prepare; from imgvae.config import DataConfig
prepare(['$corpus'], DataConfig(), '$corpus-cache', progress=False)"
fi
for round in $(seq "${ROUNDS:-2}"); do
  for tree in "$old" "$new"; do
    if [ "${VARIANT:-b}" = demo ]; then
      run=$(mktemp -d)
      (cd "$tree" && PYTHONPATH="$tree/src" "$python" -m imgvae train --config demo -o "$run" --no-progress >/dev/null)
      result=$("$python" -c "import json; s = json.load(open('$run/summary.json')); m = json.load(open('$run/metrics.json'))
print(f\"{s['images_seen_this_run'] / s['seconds_this_run']:.1f} img/s, PSNR {m['reconstruction']['psnr']['mean']!r}\")")
      rm -rf "$run"
    else
      result=$(cd "$tree" && PYTHONPATH="$tree/src" "$python" bench/train_speed.py --variant "${VARIANT:-b}" \
        --corpus "$corpus" --cache "$corpus-cache" --batch 64 --device auto --workers 2 --model seed | tail -1)
    fi
    echo "$tree, round $round: $result"
  done
done
