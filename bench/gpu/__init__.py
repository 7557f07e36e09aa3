"""What runs on the GPU machine: bench/gpu/run_device.sh and the checks it starts (bench/README.md)."""
