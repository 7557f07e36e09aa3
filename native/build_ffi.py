"""cffi builder for edge-zo's native core (API mode, out of line).

Declarations come from native/edge_zo.h, the same header edge_zo.c includes.
libllama and libggml come from the pinned llama-cpp-python wheel, which ships
their shared libraries and C headers; we link against them and, at run time,
`import llama_cpp` first so that one copy of libggml is in the process.

Environment:
  EDGE_ZO_CUDA=1|0        build the CUDA kernels (native/edge_zo_cuda.cu) or not. Unset: yes when
                          CMAKE_ARGS holds -DGGML_CUDA=on (the variable llama-cpp-python builds from),
                          or when the llama.cpp we link has a CUDA backend and nvcc is found.
  EDGE_ZO_CUDA_ARCH       nvcc target, e.g. 90, "86;89", native, all-major (default: CMAKE_ARGS's
                          -DCMAKE_CUDA_ARCHITECTURES, else all-major).
  EDGE_ZO_LLAMA_INCLUDE   header folder(s) of a llama.cpp built outside llama-cpp-python
  EDGE_ZO_LLAMA_LIB       and its library folder (os.pathsep separates several include folders).
"""
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "edge_zo.h"
SOURCE = HERE / "edge_zo.c"
CUDA_SOURCE = HERE / "edge_zo_cuda.cu"
CUDA_OBJECT = HERE.parent / "build" / "cuda" / "edge_zo_cuda.o"


def _llama_cpp_dirs():
    """(include folders, lib folder, rpath) of the llama.cpp to link against."""
    inc_env, lib_env = os.environ.get("EDGE_ZO_LLAMA_INCLUDE"), os.environ.get("EDGE_ZO_LLAMA_LIB")
    if inc_env or lib_env:
        if not (inc_env and lib_env):
            sys.exit("edge-zo: set both EDGE_ZO_LLAMA_INCLUDE and EDGE_ZO_LLAMA_LIB, or neither")
        includes = [pathlib.Path(p).resolve() for p in inc_env.split(os.pathsep) if p]
        lib = pathlib.Path(lib_env).resolve()
        if not any((d / "llama.h").exists() for d in includes) or not list(lib.glob("libllama.*")):
            sys.exit(f"edge-zo: no llama.h in {inc_env} or no libllama in {lib_env}")
        return includes, lib, str(lib)
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
    rpath = "@loader_path/../llama_cpp/lib" if sys.platform == "darwin" else "$ORIGIN/../llama_cpp/lib"
    return [include], lib, rpath


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


# ---- the optional CUDA kernels ----------------------------------------------------

def _cmake_arg(name):
    m = re.search(rf"-D{name}(?::\w+)?=(\S+)", os.environ.get("CMAKE_ARGS", ""))
    return m.group(1).strip("\"'") if m else None


def _nvcc():
    for cand in (os.environ.get("CUDACXX"),
                 *(os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)),
                 shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand):
            return pathlib.Path(cand).resolve()
    return None


def _want_cuda(lib_dir):
    flag = os.environ.get("EDGE_ZO_CUDA")
    if flag is not None:
        return flag.strip().lower() in ("1", "on", "true", "yes")
    ggml_cuda = (_cmake_arg("GGML_CUDA") or "").lower()
    if ggml_cuda:
        return ggml_cuda in ("1", "on", "true", "yes")
    return bool(list(lib_dir.glob("libggml-cuda.*"))) and _nvcc() is not None


def _arch_flags():
    arch = os.environ.get("EDGE_ZO_CUDA_ARCH") or _cmake_arg("CMAKE_CUDA_ARCHITECTURES") or "all-major"
    if arch in ("native", "all", "all-major"):
        return [f"-arch={arch}"]
    flags = []
    for a in re.split(r"[;,\s]+", arch):
        num = a.split("-")[0]
        if num:
            flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    last = re.split(r"[;,\s]+", arch.strip())[-1].split("-")[0]
    return flags + [f"-gencode=arch=compute_{last},code=compute_{last}"]  # PTX for newer GPUs


def _build_cuda():
    """Compile native/edge_zo_cuda.cu; return (object, CUDA lib folder)."""
    nvcc = _nvcc()
    if nvcc is None:
        sys.exit("edge-zo: a CUDA build was asked for (EDGE_ZO_CUDA=1 or CMAKE_ARGS=-DGGML_CUDA=on) but nvcc "
                 "was not found: install the CUDA toolkit, or point CUDACXX or CUDA_HOME at it; "
                 "EDGE_ZO_CUDA=0 builds without the CUDA kernels.")
    roots = [pathlib.Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    roots += [nvcc.parent.parent, pathlib.Path("/usr/local/cuda")]
    cuda_lib = next((d for r in roots for d in (r / "lib64", r / "lib", r / "targets" / "x86_64-linux" / "lib")
                     if list(d.glob("libcudart.so*")) or list(d.glob("libcudart.*dylib"))), None)
    if cuda_lib is None:
        sys.exit(f"edge-zo: no libcudart beside {nvcc}; point CUDA_HOME at the CUDA toolkit")
    CUDA_OBJECT.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(nvcc), "-O3", "-std=c++17", "-Xcompiler", "-fPIC", *_arch_flags(), "-c", str(CUDA_SOURCE),
           "-o", str(CUDA_OBJECT)]
    print("edge-zo:", " ".join(cmd), file=sys.stderr)
    if subprocess.run(cmd).returncode != 0:
        sys.exit("edge-zo: nvcc failed on native/edge_zo_cuda.cu (see above). EDGE_ZO_CUDA_ARCH picks the GPU "
                 "target (e.g. 86); EDGE_ZO_CUDA=0 builds without the CUDA kernels.")
    return CUDA_OBJECT, cuda_lib


include_dirs, lib_dir, rpath = _llama_cpp_dirs()
openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
extra_objects, macros, libraries, library_dirs, rpaths = [], [], ["llama", "ggml", "ggml-base"], [str(lib_dir)], [rpath]
if _want_cuda(lib_dir):
    cuda_object, cuda_lib = _build_cuda()
    extra_objects.append(str(cuda_object))
    macros.append(("EDGE_ZO_CUDA", "1"))
    libraries.append("cudart")
    library_dirs.append(str(cuda_lib))
    rpaths.append(str(cuda_lib))

ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "edge_zo._edge_zo_native",
    '#include "edge_zo.h"',
    sources=[os.path.relpath(SOURCE)],
    include_dirs=[str(HERE), *map(str, include_dirs)],
    library_dirs=library_dirs,
    libraries=libraries,
    define_macros=macros,
    extra_objects=extra_objects,
    # setuptools relinks only when a dependency is newer than the extension: without these, an edited
    # edge_zo_cuda.cu (recompiled above) or header left the old kernels in the module.
    depends=[*extra_objects, str(HEADER), str(HERE / "edge_zo_cuda.h")],
    extra_compile_args=["-O3", "-std=gnu11", *openmp],
    extra_link_args=[*openmp, *(f"-Wl,-rpath,{r}" for r in rpaths), f"-Wl,-rpath,{lib_dir}"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
