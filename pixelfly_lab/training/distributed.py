"""Distributed helpers of the training loop: join torchrun's process group, sum over ranks, check sync.

Under ``torchrun`` (WORLD_SIZE > 1) :func:`setup` joins the process group (gloo on CPU, nccl on
GPUs) and picks this rank's device; with one process every helper is a no-op, so the loop calls
them unconditionally. :func:`gather_fingerprints` hashes every rank's parameters, which are equal
when DistributedDataParallel kept the ranks in sync.

Example:
    >>> d, device = setup("cpu")
    >>> (d.rank, d.world, device.type)
    (0, 1, 'cpu')
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed

__all__ = ["DistInfo", "setup", "all_sum", "barrier", "fingerprint", "gather_fingerprints", "teardown"]


@dataclass
class DistInfo:
    """This process's place in the run: its rank, the world size, and whether we own the process group."""

    rank: int = 0
    world: int = 1
    created: bool = False  # we initialised the process group, so we tear it down


def setup(device: str) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1; pick this rank's device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False")
    dist_info = DistInfo()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if device == "cuda" else "gloo")
            dist_info.created = True
        dist_info.rank, dist_info.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if device == "cuda":
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return dist_info, torch.device("cuda", index)
    return dist_info, torch.device("cpu")


def all_sum(tensor: torch.Tensor, d: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place (unchanged with one process); returns it."""
    if d.world > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def barrier(d: DistInfo) -> None:
    """Wait for every rank (a no-op with one process)."""
    if d.world > 1:
        torch.distributed.barrier()


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of all parameters' bytes: equal on every rank when DDP kept them in sync."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def gather_fingerprints(model: torch.nn.Module, d: DistInfo) -> list[str]:
    """Every rank's :func:`fingerprint` of ``model``, in rank order (one entry with one process)."""
    if d.world == 1:
        return [fingerprint(model)]
    fingerprints = [None] * d.world
    torch.distributed.all_gather_object(fingerprints, fingerprint(model))
    return fingerprints


def teardown(d: DistInfo) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if d.created:
        torch.distributed.destroy_process_group()
