#!/usr/bin/env bash
# The docs/quality.md sweep (issue #9), for a machine with a CUDA GPU and many cores:
# several tiny-trained bases are pretrained at once on the GPU (same step counts as the
# 2-core CPU budget; GPU numerics differ, so these bases are not the committed bytes),
# then LoHA settings are trained on each on the CPU, 2 threads per run as on the target
# machine, and scored with `verdict`. Not part of CI. Usage:
#
#     bash ci/quality_sweep.sh OUTDIR 'NAME:KEY=VALUE;KEY=VALUE' ... -- 'LNAME:OVERRIDES' ...
#
# e.g. bash ci/quality_sweep.sh out 'A:' 'B:unet_steps=1500;unet_lr=2e-3' -- 'lr5:train.learning_rate=5e-3'
set -uo pipefail
out="$1"; shift
bases=(); losses=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do bases+=("$1"); shift; done
[ $# -gt 0 ] && shift
losses=("$@")
mkdir -p "$out"

for spec in "${bases[@]}"; do  # pretrain every base at once on the GPU
    name=${spec%%:*}; sets=${spec#*:}
    python3 -m meebs.tiny.pretrain_tiny --device "${DEVICE:-cuda}" --out "$out/$name" \
        --set ${sets//;/ } > "$out/$name.pretrain.log" 2>&1 &
done
wait
for spec in "${bases[@]}"; do  # then every LoHA setting on every base, on the CPU
    name=${spec%%:*}
    for lspec in "${losses[@]}"; do
        lname=${lspec%%:*}; overrides=${lspec#*:}
        (
            python3 entrypoint.py train recipes/demo-learn.yaml model.builtin=null \
                model.path="$out/$name" output.dir="$out/runs/$name-$lname" train.threads=2 \
                $overrides > "$out/$name-$lname.train.log" 2>&1 &&
            OMP_NUM_THREADS=2 python3 -c "
import sys, glob, torch; from pathlib import Path; from rich.console import Console
from meebs.tiny.verdict import make_verdict
torch.set_num_threads(2)
run = Path(sorted(glob.glob('$out/runs/$name-$lname/*/*'))[-1])
make_verdict(run, Console(width=120), scorer_dir=Path('$out/$name/scorer'))
" > "$out/$name-$lname.verdict.log" 2>&1
        ) &
    done
done
wait
