#!/usr/bin/env bash
# The GPU checks of issues 10 (part 5) and of the CUDA paths, as one prepared run on a lent GPU
# machine (the `device` tool of /work/.library: one call, about 15 minutes of device time in all).
#
#   bash scripts/gpu_checks.sh --prepare        # here, once: fills .gpu/ (ignored; about 48 MB)
#   device run: command="bash scripts/gpu_checks.sh", carry=[".gpu"], timeout_s=560
#
# What travels is the repository and .gpu/: the wheels the GPU image lacks (bitsandbytes, peft,
# rouge-score, nltk, gguf) and SmolLM2-135M-Instruct's config and tokenizer. The model's weights
# (the bundled GGUF is 94 MB, the dequantised safetensors 514 MB) exceed what travels (64 MiB),
# so the checks build a SmolLM2 with the real architecture and tokenizer and random weights:
# times and memory depend on shapes, not values; only generation lengths differ (a random model
# never stops early), which makes evaluation, and so each round's total, longer.
#
# Each step has its own time limit, so that one slow step does not cost the others; everything
# is logged to $OUT/gpu_checks.log, and the benches' JSON is written beside it.
# DEVICE=cpu QUICK=1 bash scripts/gpu_checks.sh runs the same steps, small, on this machine
# (to check the script, not to measure).
set -uo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu

if [ "${1:-}" = "--prepare" ]; then
  set -e
  py=.venv/bin/python
  [ -x "$py" ] || { echo "run scripts/setup.sh first"; exit 1; }
  mkdir -p "$GPU/whl" "$GPU/smollm2"
  # The GPU image runs Python 3.12; these are pure-Python or manylinux wheels.
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$GPU/whl" bitsandbytes==0.50.2 peft==0.21.2 nltk==3.10.4 gguf==0.19.0
  "$py" -m pip wheel -q --no-deps -w "$GPU/whl" rouge-score==0.1.2  # published as a source archive only
  "$py" - "$GPU/smollm2" <<'EOF'
import shutil, sys
from pathlib import Path
from flexlora.models import SMOLLM2, cache_dir, load_model
load_model(SMOLLM2, "cpu")  # makes sure the dequantised copy (config, tokenizer) is cached
for f in (cache_dir() / SMOLLM2).iterdir():
    if f.name != "model.safetensors":
        shutil.copy(f, Path(sys.argv[1]) / f.name)
EOF
  du -sh "$GPU"
  exit 0
fi

OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
LOG="$OUT/gpu_checks.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 FLEXLORA_CACHE=/tmp/flexlora-cache

if [ "$DEVICE" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$GPU"/whl/*.whl || exit 1
  export PYTHONPATH="$PWD/src:/tmp/site"
  PY=python3
else
  PY=.venv/bin/python
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, print its exit status
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name ($(date -u +%T), limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=KILL "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0)) s"
}

# Issue 21 part 5, as its own device run (it needs the whole budget):
#   device run: command="bash scripts/gpu_checks.sh --deployment", carry=[".gpu"], timeout_s=560
# `flexlora bench deployment` on a 1B-class model (random-llama-1b: TinyLlama-1.1B's shapes, random
# weights) in bfloat16 and nf4, 2 SuperNodes, 2 rounds, with and without node workers, and
# in-process, the factors packed in bfloat16 on the wire (goal: overhead <= 25% of training). It needs Flower's binaries (flwr, flower-superlink, flower-supernode) in the GPU
# image: flwr and its dependencies (uv alone is ~18 MB) do not fit beside .gpu/ in what travels,
# so without them the step says so and ends. The simulation reference needs Ray as well.
if [ "${1:-}" = "--deployment" ]; then
  step env 60 $PY -c "import torch, flwr; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'flwr', flwr.__version__)" \
    || true
  if ! $PY -c "import flwr" 2>/dev/null || ! command -v flower-superlink >/dev/null; then
    echo "SKIP bench deployment: flwr / flower-superlink not installed in this image"; exit 0
  fi
  engines=deployment+workers,deployment,in-process
  $PY -c "import ray" 2>/dev/null && engines=$engines,simulation
  for precision in bfloat16 nf4; do
    # Packed 16-bit transport (issue 32): bfloat16 factors on the wire, float32's range.
    step "deployment-$precision" 240 $PY -m flexlora.cli bench deployment --model random-llama-1b --precision "$precision" \
      --device auto --nodes 2 --rounds 2 --engines "$engines" --startup-repeat 1 --json "$OUT/deployment-$precision.json" \
      flower.transport_dtype=bfloat16
  done
  echo; echo "=== done ($(date -u +%T))"; ls -la "$OUT"; exit 0
fi

step env 60 $PY -c "
import torch, transformers, peft
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
print('transformers', transformers.__version__, 'peft', peft.__version__)
import bitsandbytes, rouge_score; print('bitsandbytes', bitsandbytes.__version__)"

# SmolLM2-135M-Instruct's architecture and tokenizer, random weights (see the top of this file).
MODEL=/tmp/smollm2-random
step model 120 $PY - "$GPU/smollm2" "$MODEL" <<'EOF'
import shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name.startswith(("tokenizer", "chat_template", "generation_config")):
        shutil.copy(f, dst / f.name)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters at {dst}")
EOF

if [ "$DEVICE" = cuda ]; then  # the CUDA tests (they skip on a machine without a GPU)
  step cuda-tests 150 $PY -m pytest -q -p no:cacheprovider -p no:warnings tests/test_memory.py -k cuda -rs
fi

if [ "$QUICK" = 1 ]; then SIZES=quick; REPEAT=1; CLIENTS=2,4; else SIZES=1.3b,8b; REPEAT=3; CLIENTS=10,80; fi

# Issue 10 part 3 on the GPU: both regimes, every size, median of the repeats.
step aggregate 150 $PY -m flexlora.cli bench aggregate --device "$DEVICE" --sizes "$SIZES" --modes auto \
  --repeat "$REPEAT" --json "$OUT/aggregate.json"

# Issue 10 part 2 on the GPU: the default run's time breakdown (the server's share per round).
RUNS=/tmp/gpu-runs
extra=(); [ "$QUICK" = 1 ] && extra=(federation.rounds=1 train.steps=1 eval.max_examples_per_client=1 eval.max_new_tokens=2)
step default-run 150 $PY -m flexlora.cli run --overwrite model="$MODEL" device="$DEVICE" \
  output.dir="$RUNS" output.name=default "${extra[@]}"
cp "$RUNS/default/metrics.jsonl" "$OUT/default_run_metrics.jsonl" 2>/dev/null

# Issue 10 parts 4-5 on the GPU: memory, seconds per client and the server's share at 10 and 80 clients.
step scale 200 $PY -m flexlora.cli bench scale --clients "$CLIENTS" --model "$MODEL" --out "$OUT/scale.json" \
  device="$DEVICE"

# Client throughput and memory per precision on a 1B model (NF4 needs bitsandbytes' CUDA kernels).
if [ "$DEVICE" = cuda ]; then
  step client 120 $PY -m flexlora.cli bench client --device cuda --models random-llama-1b \
    --options float32,bfloat16,nf4 --json "$OUT/client.json"
fi
echo; echo "=== done ($(date -u +%T))"; ls -la "$OUT"
