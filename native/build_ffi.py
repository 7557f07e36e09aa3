"""cffi builder for edge-zo's native core (API mode, out of line).

Declarations come from native/edge_zo.h, the same header edge_zo.c includes.
libllama and libggml come from the pinned llama-cpp-python wheel, which ships
their shared libraries and C headers; we link against them and, at run time,
`import llama_cpp` first so that one copy of libggml is in the process.
"""
import importlib.util
import os
import pathlib
import sys

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "edge_zo.h"
SOURCE = HERE / "edge_zo.c"


def _llama_cpp_dirs():
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "edge-zo: building the native core needs llama-cpp-python==0.3.36 installed "
            "(it provides libllama and its headers). Run: pip install llama-cpp-python==0.3.36"
        )
    pkg = pathlib.Path(spec.submodule_search_locations[0])
    site = pkg.parent
    lib = pkg / "lib"
    include = next((d for d in (site / "include", pkg / "include") if (d / "llama.h").exists()), None)
    if include is None or not (lib / "libllama.so").exists() and not (lib / "libllama.dylib").exists():
        sys.exit(
            f"edge-zo: llama-cpp-python at {pkg} has no headers or libllama; reinstall it from source: "
            "pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python==0.3.36"
        )
    return include, lib


def _cdef():
    # cffi parses plain declarations: drop preprocessor lines, keep #define constants.
    lines = []
    for line in HEADER.read_text().splitlines():
        s = line.strip()
        if s.startswith("#define EZ_"):
            lines.append(s)
        elif not s.startswith("#"):
            lines.append(line)
    return "\n".join(lines)


include_dir, lib_dir = _llama_cpp_dirs()
openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
rpath = "@loader_path/../llama_cpp/lib" if sys.platform == "darwin" else "$ORIGIN/../llama_cpp/lib"

ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "edge_zo._edge_zo_native",
    '#include "edge_zo.h"',
    sources=[os.path.relpath(SOURCE)],
    include_dirs=[str(HERE), str(include_dir)],
    library_dirs=[str(lib_dir)],
    libraries=["llama", "ggml", "ggml-base"],
    extra_compile_args=["-O3", "-std=gnu11", *openmp],
    extra_link_args=[*openmp, f"-Wl,-rpath,{rpath}", f"-Wl,-rpath,{lib_dir}"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
