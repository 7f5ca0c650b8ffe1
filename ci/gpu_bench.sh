#!/usr/bin/env bash
# GPU figures for docs/performance.md (issue #7): the 1.3 recipe's settings on the full SD 1.5
# architecture (random weights) at 512 px, batch 2, through the real trainer, one
# configuration per process so each peak-VRAM figure is its own. Not part of CI (CI has
# no GPU). Run it on a CUDA machine with the project installed:
#
#     bash ci/gpu_bench.sh [OUTDIR]
#
# Each line of OUTDIR/gpu_bench.jsonl is one configuration's perf summary.
set -uo pipefail
out="${1:-gpu_bench_out}"
mkdir -p "$out"
steps="${STEPS:-20}"
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))' | tee "$out/device.txt"

# The 1.3 recipe's training settings (recipes/1.0.yaml + 1.3.yaml) on the sd15 bench case.
v13="train.mixed_precision=fp16 train.optimizer=AdamW8bit train.text_encoder_lr=5e-5
     train.noise_offset=0.06 data.resolution=512 train.threads=8 validation.enabled=false"

run() {  # NAME CASE OVERRIDES...
    local name=$1 case=$2
    shift 2
    echo "== $name: $*"
    python3 -m meebs.training.bench --one "$case" --steps "$steps" --set $v13 "$@" \
        > "$out/$name.json" 2> "$out/$name.err" || { tail -5 "$out/$name.err"; return; }
    python3 - "$name" "$out/$name.json" >> "$out/gpu_bench.jsonl" <<'EOF'
import json, sys
perf = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
print(json.dumps({"config": sys.argv[1], **perf}))
EOF
    tail -1 "$out/gpu_bench.jsonl"
}

python3 -m pytest -q -p no:cacheprovider tests/test_loha_layer.py 2>&1 | tail -3 | tee "$out/layer_tests.txt"

run floor sd15-floor
run fp16-sdpa sd15
run fp16-xformers sd15 train.attention=xformers
run fp16-checkpointing sd15 train.gradient_checkpointing=true
run fp16-adamw sd15 train.optimizer=AdamW
run fp16-lycoris-layer sd15 train.loha_layer=lycoris
run fp16-low-memory sd15 train.loha_layer=low-memory
# issue 20's goal for the factored layer: peak VRAM <= 4 GB and it/s >= the fast path's
run fp16-fast sd15 train.loha_layer=fast
run fp16-factored sd15 train.loha_layer=factored
run bf16 sd15 train.mixed_precision=bf16
run fp16-256px sd15 data.resolution=256
run fp16-256px-checkpointing sd15 data.resolution=256 train.gradient_checkpointing=true
run fp16-nondeterministic sd15 train.deterministic=false
