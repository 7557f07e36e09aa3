"""Benchmarks of edge-zo. Run each from the repository root as `python -m bench.NAME`; bench/README.md lists them."""
