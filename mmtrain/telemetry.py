"""Training-window accumulation on device, and the one collective + one host copy per log step.

Between log steps nothing here touches the host: losses and gradient norms are summed into
device tensors, counts are Python ints. At a log step :func:`collect` reduces the window across
ranks, gathers every rank's hardware vector, and copies both to the host in a single transfer.
Both collectives run on every rank.
"""

import math

import torch
from accelerate import Accelerator

from mmtrain.hardware import HW_KEYS
from mmtrain.model import LOSS_NAMES


class TrainWindow:
    """Sums over the micro-batches and optimizer steps since the last log step, on one rank."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros(len(LOSS_NAMES), device=self.device)
        self.grad_norm_sum = torch.zeros((), device=self.device)
        self.micro_batches = 0
        self.optimizer_steps = 0
        self.samples = 0

    def add_micro_batch(self, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        self.loss_sum += torch.stack([losses[k].detach().float() for k in LOSS_NAMES])
        self.micro_batches += 1
        self.samples += batch_size

    def add_optimizer_step(self, grad_norm: torch.Tensor) -> None:
        self.grad_norm_sum += grad_norm.detach().float()
        self.optimizer_steps += 1


def collect(accelerator: Accelerator, window: TrainWindow, hw_reading: list[float]) -> tuple[dict[str, float],
                                                                                            list[list[float]]]:
    """Cross-rank window means and every rank's hardware row, via one reduce, one gather, one copy.

    Returns ``({loss name: mean, "grad_norm": mean pre-clip norm}, hw rows indexed by rank)``.
    Each rank's window mean weighs its micro-batches equally, and ranks are averaged with equal
    weight: with even batches (Accelerate's default) this is the mean over all micro-batches.
    """
    local = torch.cat([window.loss_sum / max(window.micro_batches, 1),
                       (window.grad_norm_sum / max(window.optimizer_steps, 1)).view(1)])
    means = accelerator.reduce(local, reduction="mean")
    hw = accelerator.gather(torch.tensor([hw_reading], dtype=torch.float64, device=accelerator.device))
    host = torch.cat([means.double(), hw.flatten()]).tolist()  # the single device->host transfer
    n = len(LOSS_NAMES) + 1
    values = dict(zip([*LOSS_NAMES, "grad_norm"], host[:n], strict=True))
    rows = [host[n + r * len(HW_KEYS): n + (r + 1) * len(HW_KEYS)] for r in range(accelerator.num_processes)]
    return values, rows


def hardware_record(rows: list[list[float]]) -> dict[str, float]:
    """Per-rank keys ``hw/rank{r}/<key>``, plus the main process's own readings under bare names.

    Readings a rank does not have (NaN: no GPU, no NVML) are left out rather than logged as 0.
    """
    record: dict[str, float] = {}
    for rank, row in enumerate(rows):
        for key, value in zip(HW_KEYS, row, strict=True):
            if math.isfinite(value):
                record[f"hw/rank{rank}/{key}"] = value
                if rank == 0:
                    record[key] = value
    return record
