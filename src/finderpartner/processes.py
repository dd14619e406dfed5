"""How the processes of a multi-process run agree: one decision, made or voted at a fixed point by all of them.

Every function here is a collective: in a multi-process run every process must call it at the same point, or
they wait for each other until the process-group timeout (``train.dist_timeout``). In a single process they
cost nothing and return the local value. The rule the trainer follows: a decision one process makes (the run
folder, the checkpoint to resume, a time budget's step count) is broadcast from the main process; a fact each
process finds on its own (a micro-batch that fits, an out-of-memory error) is reduced, so that all act alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .errors import FinderPartnerError


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    """Where a collective's tensors live: the current CUDA device for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_min(value: int) -> int:
    """The smallest of every process's ``value``."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def any_true(flag: bool) -> bool:
    """Whether ``flag`` is true in any process."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.long, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_main(decide: Any) -> Any:
    """The main process runs ``decide()`` and every process returns its result (a picklable object).

    An error the main process raises while deciding reaches the others as the same error type and message, so
    no process is left waiting for a decision that never comes; the main process re-raises its own.
    """
    rank, size = world()
    if size == 1:
        return decide()
    box: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            box[0] = ("ok", decide())
        except FinderPartnerError as e:
            error, box[0] = e, ("error", type(e), str(e))
        except BaseException as e:  # still tell the others, then fail as we would have
            error, box[0] = e, ("error", RuntimeError, f"the main process failed: {type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0][0] == "error":
        _, kind, message = box[0]
        raise kind(message)
    return box[0][1]
