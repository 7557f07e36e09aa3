"""What scoring multi-token choices after their shared prompt saves: one forward of a choices
objective with the prompt decoded once (ez_continuation_loss) against every choice decoded as
its own whole sequence, the two paths taking turns on the same rows.

    python -m bench.choice_scoring                           # SmolLM2, the author task (3 choices), batch 8
    python -m bench.choice_scoring --task-file rows.jsonl --model m.gguf --rounds 5

Prints the median seconds of each path, their ratio, and the largest difference between the
two paths' scores (they score the same sequences; only the batch layout differs).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edge_zo.runtime import Runtime, RuntimeOptions

from ._common import emit, smollm2, task_batch, task_rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--task", default="author")
    ap.add_argument("--task-file", type=Path, default=None, help="JSONL rows with choices, instead of --task")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    model = args.model or smollm2()
    batch = task_batch(model, task_rows(args.task, args.task_file), args.batch)
    with Runtime(model, RuntimeOptions(batch_size=args.batch, max_tokens=args.max_tokens, threads=args.threads)) as rt:
        def score(shared: bool):
            t = time.perf_counter()
            s = rt.choice_scores(batch, share_prompts=shared)
            return time.perf_counter() - t, s

        score(True), score(False)            # warm-up
        times = {True: [], False: []}
        for _ in range(args.rounds):
            for shared in (True, False):
                sec, scores = score(shared)
                times[shared].append(sec)
                if shared:
                    fast = scores
                else:
                    slow = scores
    diff = max(float(np.max(np.abs(f - s))) for f, s in zip(fast, slow))
    shared_s, whole_s = statistics.median(times[True]), statistics.median(times[False])
    result = {"model": str(model), "task": str(args.task_file or args.task), "batch": args.batch,
              "choices": [len(e.choices) for e in batch], "choice_tokens": [[c.n_targets for c in e.choices] for e in batch],
              "shared_prompt_s": round(shared_s, 4), "whole_sequences_s": round(whole_s, 4),
              "speedup": round(whole_s / shared_s, 2), "max_score_difference": diff}
    print(f"shared prompt {shared_s:.3f} s, whole sequences {whole_s:.3f} s: {whole_s / shared_s:.2f}x; "
          f"largest score difference {diff:.2e}")
    return emit(result, args.json, indent=None)


if __name__ == "__main__":
    sys.exit(main())
