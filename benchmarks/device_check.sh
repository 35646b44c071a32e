#!/usr/bin/env bash
# The checks that need a CUDA device, as one short script for a session that is lent one
# (run from the repository root, in an environment with a CUDA build of torch and the
# test extras installed; nothing here runs in CI, which has no device).
#
#   bash benchmarks/device_check.sh            # about 2 minutes on one GPU
#
# 1. the engine's exactness tests parametrized over devices (dropout's CUDA draws replayed by
#    re-runs; the low-memory step, whose backward runs in autograd's worker threads there);
# 2. the loss-only methods' closed forms (made on the CPU from floats, then moved to the device);
# 3. the low-memory example: the peak allocated memory of a plain, a default and a low-memory
#    step (torch.cuda.max_memory_allocated) on a small CNN, and the same steps both ways.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest -q -p no:randomly -k cuda \
    tests/autogram/test_engine_correctness.py tests/autogram/test_low_memory.py \
    tests/scalarization/test_closed_forms.py
python examples/low_memory.py
