#!/usr/bin/env bash
# The GPU checks in one short script, for a CUDA machine where loraflow is installed with its GPU extra
# (`pip install -e '.[gpu]'`: flash-attn built for the machine's CUDA). CI has no GPU, so these run only here:
#   1. tests/test_gpu.py: evaluation puts the model on the GPU (with the CPU's loss), and the sample answers given
#      during training are generated there;
#   2. bench/train.py at r=8: padded, length-grouped and TRL-packed HF training against loraflow's packed rows
#      (FlashAttention 2 on padding-free rows when flash-attn is installed, else SDPA), with peak allocated memory;
#   3. bench/generate.py: the evaluate stage's generation (a static KV cache, compiled decoding) against plain generate.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c 'import importlib.util, torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "flash-attn:",
              "yes" if importlib.util.find_spec("flash_attn") else "no (loraflow trains with SDPA)")'
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py
"$PYTHON" bench/train.py --ranks 8 --no-classification
"$PYTHON" bench/generate.py
