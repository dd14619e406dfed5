"""``finderpartner`` as one process of a torchrun job, with a fault put into one process only (for the tests).

Environment:
- ``FP_TEST_OOM_RANK`` / ``FP_TEST_OOM_CALL``: in that process, the Nth embedding call of training raises a CUDA
  out-of-memory error (once); the other processes run normally.
- ``FP_TEST_CACHE_PER_RANK``: each process keeps its micro-batch cache in ``<that folder>/rank<R>``, so that one
  process can find a cached size while another has to probe.
- ``FP_TEST_PID_DIR``: each process writes its PID to ``<that folder>/rank<R>.pid`` (for a signal to one of them).
"""

from __future__ import annotations

import os
import sys

import torch

rank = int(os.environ.get("RANK", "0"))
if pid_dir := os.environ.get("FP_TEST_PID_DIR"):
    with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
if base := os.environ.get("FP_TEST_CACHE_PER_RANK"):
    os.environ["FINDERPARTNER_CACHE"] = os.path.join(base, f"rank{rank}")

if os.environ.get("FP_TEST_OOM_RANK") == str(rank):
    import finderpartner.train.step as step

    real_embed_pair, calls, fail_at = step.embed_pair, [0], int(os.environ["FP_TEST_OOM_CALL"])

    def embed_pair_out_of_memory_once(encoder, batch):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == fail_at:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected into process {rank} only)")
        return real_embed_pair(encoder, batch)

    step.embed_pair = embed_pair_out_of_memory_once

from finderpartner.cli import main  # noqa: E402 - after the fault is in place

sys.exit(main(sys.argv[1:]))
