#!/usr/bin/env bash
# Every GPU number the README's speed section asks for, in one run on one CUDA GPU (about 10 minutes on an H100):
#   bash scripts/gpu_benchmarks.sh OUT_DIR
# Needs torch with CUDA, pytorch-lightning, torchmetrics, matplotlib, omegaconf and pytest (the model's steps need
# nothing of the data stack) and, for the peers' rows, timm and transformers. It runs this checkout's code
# (installed or not); where omegaconf or pytest is missing and a folder .whl/ of their wheels is here (carry it to
# an offline machine), they are installed from it into /tmp/gpu_site.
# Writes OUT_DIR/*.json (the benchmark tables) and OUT_DIR/*.log (everything printed).
#   tiny_bf16    SwinV2-T SimMIM step, 192 px / window 12, batch 128, bf16: ours eager and compiled (SDPA and
#                FlexAttention) against timm and transformers, eager and compiled, with MFU
#   base_bf16    the same for SwinV2-B, compiled (the 25 %-of-peak goal)
#   tiny_fp32    32-true with and without TF32 matmuls (trainer.tf32)
#   flex_tests   FlexAttention's equality tests, gradients included (CUDA only)
#   fsdp_compile a few training steps with model.compile=true under single-device and FSDP strategies
set -uo pipefail
out=${1:?usage: bash scripts/gpu_benchmarks.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if ! python -c "import omegaconf, pytest" 2> /dev/null && [ -d .whl ]; then
    python -m pip install -q --no-index --no-deps --target /tmp/gpu_site .whl/*.whl
    export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's code, installed or not
failed=0
step() {  # step NAME COMMAND...: run it, keep its output, go on to the next one when it fails
    local name=$1
    shift
    echo "== $name: $*"
    if ! "$@" > "$out/$name.log" 2>&1; then
        echo "!! $name failed (see $out/$name.log)"
        failed=1
    fi
    tail -n 20 "$out/$name.log"
}
common="img_size=192 window_size=12 batch_size=128 norm_target=null steps=10 warmup=2"
step tiny_bf16 python scripts/benchmark.py model=tiny $common peers=true \
    configs=[fast_bf16,compiled_bf16,compiled_flex_bf16] out="$out/tiny_bf16.json"
step base_bf16 python scripts/benchmark.py model=base $common peers=true \
    configs=[compiled_bf16,compiled_flex_bf16] out="$out/base_bf16.json"
fp32="model=tiny img_size=192 window_size=12 batch_size=64 steps=10 warmup=2 configs=[fast]"
step tiny_fp32 python scripts/benchmark.py $fp32 tf32=false out="$out/tiny_fp32.json"
step tiny_tf32 python scripts/benchmark.py $fp32 tf32=true out="$out/tiny_tf32.json"
step flex_tests python -m pytest -q tests/test_swinv2.py -k flex
step fsdp_compile python scripts/gpu_check.py compile=true strategies=single,fsdp steps=20 warmup=5 \
    out="$out/fsdp_compile.json"
exit "$failed"
