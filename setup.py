# The package metadata lives in pyproject.toml; this file only wires the cffi
# extension (native/edge_zo.c) into the build.
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
