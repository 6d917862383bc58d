#!/usr/bin/env bash
# The GPU check: graft's CUDA build on a lent GPU, against the diffusers + PEFT references and
# against diffusers + PEFT itself on the same card. A GPU machine has no Rust toolchain and no
# network, so everything is built here and carried there (see docs/PERFORMANCE.md, "On a GPU").
#
#   tools/gpu-check.sh prepare   here: builds the release binary with --features cuda
#                                (tools/cuda-build.sh) and the strategy plugins, strips them, and
#                                puts them with the diffusers wheel into target/gpu-check/
#   tools/gpu-check.sh run       there, from the repository root, through the device tool:
#                                run(command="tools/gpu-check.sh run", carry=["target/gpu-check"],
#                                    timeout_s=540)
#
# `run` (under 8 minutes on an H100) writes to $OUT (default target/gpu-check/out):
#   device-check.md   the tiny fixture on the GPU and the CPU vs the committed references:
#                     generate (4 steps) and a LoRA step, f32 and bf16 (`graft device-check`)
#   demo.md           the three shipped strategies, 20 steps each on the tiny model (`graft demo`)
#   table.md          real-size SDXL (random weights): generate 1024 px 30 steps, LoRA r16 step at
#                     1024 px in bf16 with and without checkpointing, graft vs diffusers + PEFT:
#                     time and peak GPU memory (`graft bench --gpu`, bench_reference.py --gpu)
#   graft.jsonl, reference.jsonl, log.txt
# Without a GPU it says so and exits with status 2 (GPU_CHECK_DRY_RUN=1: the tiny-fixture steps on
# the CPU instead, to try the kit here).
set -euo pipefail
cd "$(dirname "$0")/.."
kit=target/gpu-check
workloads=(real.generate_1024_30steps real.train_step_1024 real.train_step_1024_ckpt)

prepare() {
    local bin plugins=(lora attention-gate progressive-fusion)
    bin=$(tools/cuda-build.sh --release | tail -1)
    cargo build --release -q $(printf -- '-p %s ' "${plugins[@]}")
    rm -rf "$kit" && mkdir -p "$kit/plugins" "$kit/wheels"
    cp "$(dirname "$bin")/libcudart.so.13" "$kit/"
    for p in "${plugins[@]}"; do cp "target/release/lib${p//-/_}.so" "$kit/plugins/"; done
    strip "$kit"/plugins/*.so
    # Stripped, the binary is about 68 MB (candle's kernels for sm_90 inside), over what the device
    # tool carries: it travels compressed (about 10 MB).
    strip -o "$kit/graft" "$bin"
    xz -T2 -6 "$kit/graft"
    # diffusers is not on the GPU machines (torch, transformers and peft are).
    python3 -m pip download -q --no-deps -d "$kit/wheels" diffusers==0.42.1
    du -sh "$kit"
}

run() {
    local out=${OUT:-$kit/out} work=$kit/work
    mkdir -p "$out" "$work"
    exec > >(tee "$out/log.txt") 2>&1
    local gpu=1
    if ! nvidia-smi -L 2>/dev/null | grep -q GPU; then
        if [ -z "${GPU_CHECK_DRY_RUN:-}" ]; then
            echo "gpu-check: no NVIDIA GPU on this machine (nvidia-smi lists none); run it on a lent GPU" \
                "through the device tool, see docs/PERFORMANCE.md"
            exit 2
        fi
        # GPU_CHECK_DRY_RUN=1: the same steps on the CPU, to try the kit here; no real-size part.
        echo "gpu-check: dry run on the CPU"
        gpu=0
    fi
    [ -f "$kit/graft.xz" ] || { echo "gpu-check: no $kit/graft.xz: run 'tools/gpu-check.sh prepare' here first" >&2; exit 1; }
    # The binary beside the CUDA runtime (its rpath is $ORIGIN); python's lzma, as xz may be missing.
    mkdir -p "$work/bin"
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$kit/graft.xz" "$work/bin/graft"
    chmod +x "$work/bin/graft"
    cp "$kit/libcudart.so.13" "$work/bin/"
    [ $gpu = 1 ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    # cuBLAS, cuRAND and NVRTC from torch's NVIDIA wheels: graft loads them at run time.
    LD_LIBRARY_PATH=$(python3 -c 'import glob, os, site
dirs = {os.path.dirname(p) for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/**/lib*.so*", recursive=True)}
print(":".join(sorted(dirs)))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export LD_LIBRARY_PATH
    for w in "$kit"/wheels/*.whl; do python3 -m zipfile -e "$w" "$work/python"; done
    export PYTHONPATH=$PWD/$work/python${PYTHONPATH:+:$PYTHONPATH} GRAFT_BENCH_SDXL=$PWD/$work/sdxl-random-fp16
    local graft=(timeout 60 "$work/bin/graft") plugins=(--no-default-plugins --plugins "$kit/plugins") status=0
    step() { echo "== $*"; "$@" || { echo "gpu-check: FAILED ($?): $*"; status=1; }; }

    step "${graft[@]}" device-check "${plugins[@]}" --out "$out/device-check.md"
    step "${graft[@]}" demo --steps 20 --no-build "${plugins[@]}" --out "$work/demo"
    [ -f "$work/demo/report.md" ] && cp "$work/demo/report.md" "$out/demo.md"
    [ $gpu = 1 ] || exit $status
    local ws=() w
    for w in "${workloads[@]}"; do ws+=(--workload "$w"); done
    step timeout 180 "$work/bin/graft" bench --gpu "${plugins[@]}" "${ws[@]}" --json "$out/graft.jsonl"
    step timeout 180 python3 tools/reference/bench_reference.py --gpu "${ws[@]}" --json "$out/reference.jsonl"
    python3 tools/reference/bench_reference.py --table "$out/graft.jsonl" "$out/reference.jsonl" --markdown | tee "$out/table.md" || status=1
    exit $status
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: tools/gpu-check.sh prepare | run   (see the top of this file)" >&2; exit 2 ;;
esac
