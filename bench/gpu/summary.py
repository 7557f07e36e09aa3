"""One line per bench/gpu/bench.py result in a folder (run_device.sh prints these last)."""
import json
import pathlib
import sys

for p in sorted(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out/gpu").glob("bench_*.json")):
    r = json.loads(p.read_text())
    print(f"{p.stem} ({r['seqs']}x{r['tokens']}, ubatch {r.get('ubatch', 512)}, kv_unified {r.get('kv_unified', False)}): loss-call ratio {r['ratio']:.3f} (split only {r['ratio_split_only']:.3f}), plain "
          f"{r['plain_median_s'] * 1e3:.1f} ms, sparse {r['sparse_median_s'] * 1e3:.1f} ms | forward ratio "
          f"{r.get('ratio_fwd', 0):.3f} (split only {r.get('ratio_fwd_split_only', 0):.3f}), plain "
          f"{r.get('plain_fwd_median_s', 0) * 1e3:.1f} ms, sparse {r.get('sparse_fwd_median_s', 0) * 1e3:.1f} ms | "
          f"steps/s {r['steps_per_s'] or 0:.2f} | GPU memory peak {r['gpu_mem_peak_mib']} MiB "
          f"(llama.cpp alone {r.get('gpu_mem_plain_peak_mib')} MiB) | counts {r['path_counts']}")
