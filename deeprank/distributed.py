"""Several processes, one run: torch.distributed as torchrun starts it (gloo on CPUs, nccl on
CUDA GPUs), or a single process when there is no torchrun.

    cluster, device = Cluster.start("auto")   # world_size 1 under plain `python`
    rows = cluster.part(all_rows)             # this rank's contiguous share
    emb = cluster.gather(local_emb, columns=3)  # the global batch, in single-process order, on every rank

Gathered embeddings: every rank receives every rank's rows, in rank order, so each computes
the loss of the whole global batch (the same value everywhere). The other ranks' rows arrive
as constants; each rank back-propagates through its own rows. Summed over ranks that is the
gradient of the global loss, and DistributedDataParallel averages over ranks: so the loss is
multiplied by world_size before backward (grad_scale), and the update equals one process's.
"""

import datetime
import os

import torch
import torch.distributed as dist

from deeprank.common import PipelineError
from deeprank.runtime import resolve_device

TIMEOUT_MINUTES = 30  # a collective that waits longer than this fails (a rank that hangs, not one that died)


class Cluster:
    """This process's place in the run: world_size, rank (0 writes the files), local_rank."""

    def __init__(self, world_size=1, rank=0, local_rank=0, device=None):
        self.world_size, self.rank, self.local_rank = world_size, rank, local_rank
        self._device = device or torch.device("cpu")  # where small collective tensors live (nccl: the GPU)

    @classmethod
    def start(cls, device_name):
        """(Cluster, device) from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK,
        MASTER_ADDR / rendezvous); one process without it. CUDA: one GPU per local rank, nccl."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        device = resolve_device(device_name)
        if world <= 1:
            return cls(), device
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise PipelineError(f"local rank {local} has no GPU of its own ({torch.cuda.device_count()} here); "
                                    f"start at most that many processes per node (--nproc_per_node)")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=TIMEOUT_MINUTES))
        return cls(world, rank, local, device), device

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def main(self):
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def grad_scale(self):
        """What the loss is multiplied by before backward (see the module docstring)."""
        return self.world_size

    def part(self, items):
        """This rank's contiguous share of a sequence (shares differ by at most one item)."""
        n = len(items)
        return items[n * self.rank // self.world_size:n * (self.rank + 1) // self.world_size]

    def gather(self, x, columns=1, grad=True):
        """Every rank's x, concatenated as one process would hold the global batch.

        x: (columns * b, ...) laid out columns first (a CSV batch's queries, positives,
        negatives: columns=3; pairs: 2; images: 1); b may differ between ranks. The result is
        (columns * sum(b), ...), each column's rows in rank order. With grad, this rank's own
        rows keep their gradient (the others' are constants)."""
        if not self.distributed:
            return x
        local = x.reshape(columns, -1, *x.shape[1:])
        sizes = torch.tensor([local.shape[1]], device=x.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(self.world_size)]
        dist.all_gather(all_sizes, sizes)
        all_sizes = [int(s) for s in all_sizes]
        padded = local.detach()
        if local.shape[1] < max(all_sizes):
            pad = padded.new_zeros((columns, max(all_sizes) - local.shape[1], *local.shape[2:]))
            padded = torch.cat([padded, pad], 1)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        parts = [part[:, :size] for part, size in zip(parts, all_sizes, strict=True)]
        if grad:
            parts[self.rank] = local
        return torch.cat(parts, 1).reshape(-1, *x.shape[1:])

    def every_rank(self, flag):
        """Whether flag holds on every rank (True alone without torchrun): ranks skip a step together."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(bool(flag))], device=self._device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def maximum(self, value):
        """The largest of every rank's value (the value itself without torchrun)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self._device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def gather_objects(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable things)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def run(self, work, *args):
        """work(*args), then leave the process group. Under torchrun, a collective that fails because
        another rank stopped (its own error printed above) becomes one line saying so."""
        try:
            return work(*args)
        except Exception as err:  # noqa: BLE001 - sorted below: only a peer's failure is translated
            if self.distributed and not isinstance(err, PipelineError) and is_peer_failure(err):
                raise PipelineError(f"rank {self.rank} stopped because another process of this run stopped "
                                    f"({type(err).__name__}); that process's error is above") from None
            raise
        finally:
            self.stop()

    def stop(self):
        """Leave the process group (at the end of a run; safe to call twice)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def is_peer_failure(err):
    """Whether an exception is a collective failing (another rank died or hung), not this rank's own error."""
    return isinstance(err, getattr(dist, "DistError", ())) or (
        isinstance(err, RuntimeError) and any(word in str(err).lower() for word in (
            "connection", "gloo", "nccl", "closed by peer", "timed out", "broken pipe")))
