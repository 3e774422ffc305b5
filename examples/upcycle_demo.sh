#!/usr/bin/env bash
# Upcycling demo (issue: "show with a short run that an upcycled model starts at a lower loss than a random MoE
# of the same shape"). Trains a dense tiny model, upcycles it into a tiny MoE whose shared experts are as wide as
# the dense FFN (6 x 64 = 384 units, so the upcycled model computes exactly the dense function at step 0), then
# trains the upcycled MoE and a randomly initialised MoE of the same shape with the same data and settings.
# Prints the first losses of both runs. Usage: examples/upcycle_demo.sh [RUN_ROOT] [DENSE_STEPS] [MOE_STEPS]
set -euo pipefail
root=${1:-runs/upcycle-demo}; dense_steps=${2:-200}; moe_steps=${3:-30}
common=(--max-bytes 3000000 --batch-size 16 --seq-len 256 --eval-every 1000000 --sample-tokens 0 --overwrite)  # re-runnable
mkdir -p "$root"
dsv2 train --out "$root/dense" --set n_routed_experts=0 --max-steps "$dense_steps" \
           --save-every "$dense_steps" "${common[@]}"
dense_ckpt=$(ls -d "$root"/dense/checkpoints/step_* | tail -n 1)
python - "$root/moe_config.json" <<'PY'
import sys
import dsv2
dsv2.get_config("tiny", n_shared_experts=6).save(sys.argv[1])
PY
dsv2 upcycle "$dense_ckpt" --config "$root/moe_config.json" "$root/upcycled"
dsv2 train --out "$root/moe-upcycled" --init-from "$root/upcycled" --max-steps "$moe_steps" --lr 1e-3 \
           --warmup-steps 5 --save-every "$moe_steps" "${common[@]}"
dsv2 train --out "$root/moe-random" --preset "$root/moe_config.json" \
           --tokenizer "$root/dense/tokenizer/tokenizer.json" --max-steps "$moe_steps" --lr 1e-3 \
           --warmup-steps 5 --save-every "$moe_steps" "${common[@]}"
python - "$root" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
def losses(run):
    return [json.loads(line)["loss"] for line in (root / run / "metrics.jsonl").read_text().splitlines()]
dense, up, rnd = losses("dense"), losses("moe-upcycled"), losses("moe-random")
print(f"dense model, last step:        loss {dense[-1]:.3f}")
print("step  upcycled MoE  random MoE")
for i in (0, 1, 4, 9, len(up) - 1):
    if i < len(up):
        print(f"{i + 1:4d}  {up[i]:12.3f}  {rnd[i]:10.3f}")
PY
