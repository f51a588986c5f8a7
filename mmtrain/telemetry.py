"""Training-window accumulation on device, and one gather + one host copy per log step.

Between log steps nothing here touches the host: losses, metric sums and gradient norms are
added into device tensors, counts are Python ints. At a log step every rank packs its window
into one float64 vector, :func:`gather_rows` all-gathers the vectors (the single collective,
called on every rank) and copies the (world, K) result to the host once. The main process then
combines the rows into the logged record with plain Python (:func:`window_record`).
"""

import math
import time

import torch
from accelerate import Accelerator
from torch import Tensor

from mmtrain.hardware import HW_KEYS
from mmtrain.metrics import GRAD_FIELDS, MAX_FIELDS, SUM_FIELDS, summarize, summarize_grads
from mmtrain.model import LOSS_NAMES


class Window:
    """Sums over the micro-batches and optimizer steps since ``reset`` on one rank."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        f64 = {"dtype": torch.float64, "device": self.device}
        self.loss_sum = torch.zeros(len(LOSS_NAMES), **f64)
        self.sample_sums = torch.zeros(len(SUM_FIELDS), **f64)
        self.sample_maxes = torch.full((len(MAX_FIELDS),), -math.inf, **f64)
        self.grad_sums = torch.zeros(3, **f64)  # pre-clip norms, post-clip norms, clipped steps
        self.grad_norm_max = torch.zeros((), **f64)
        self.last_clip_coef = torch.ones((), **f64)
        self.micro_batches = 0
        self.optimizer_steps = 0
        self.samples = 0
        self.skipped_steps = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    _TENSORS = ("loss_sum", "sample_sums", "sample_maxes", "grad_sums", "grad_norm_max", "last_clip_coef")
    _COUNTS = ("micro_batches", "optimizer_steps", "samples", "skipped_steps", "data_wait")

    def state_dict(self) -> dict[str, object]:
        """For checkpoints: a resumed run continues the window instead of logging a partial one."""
        return {**{k: getattr(self, k).cpu() for k in self._TENSORS}, **{k: getattr(self, k) for k in self._COUNTS},
                "elapsed": time.perf_counter() - self.started}

    def load_state_dict(self, state: dict[str, object]) -> None:
        for k in self._TENSORS:
            setattr(self, k, state[k].to(self.device))
        for k in self._COUNTS:
            setattr(self, k, state[k])
        self.started = time.perf_counter() - state["elapsed"]  # the time spent down is not step time

    def add_micro_batch(self, losses: dict[str, Tensor], batch_size: int,
                        stats: tuple[Tensor, Tensor] | None = None) -> None:
        self.loss_sum += torch.stack([losses[k].detach() for k in LOSS_NAMES]).double()
        if stats is not None:
            self.sample_sums += stats[0].sum(dim=0)
            torch.maximum(self.sample_maxes, stats[1].amax(dim=0), out=self.sample_maxes)
        self.micro_batches += 1
        self.samples += batch_size

    def add_optimizer_step(self, grad_norm: Tensor, max_norm: float) -> None:
        """``grad_norm`` is the pre-clip norm ``clip_grad_norm_`` returned; the clip coefficient
        is recomputed exactly as torch does (max_norm / (norm + 1e-6), capped at 1)."""
        norm = grad_norm.detach().double()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0) if math.isfinite(max_norm) else torch.ones_like(norm)
        self.grad_sums += torch.stack([norm, norm * coef, (coef < 1.0).double()])
        self.grad_norm_max = torch.maximum(self.grad_norm_max, norm)
        self.last_clip_coef = coef
        self.optimizer_steps += 1

    def device_parts(self) -> dict[str, Tensor]:
        grad = torch.cat([self.grad_sums, self.grad_norm_max.view(1), self.last_clip_coef.view(1)])
        return {"loss": self.loss_sum, "sums": self.sample_sums, "maxes": self.sample_maxes, "grad": grad}

    def host_values(self) -> list[float]:
        elapsed = time.perf_counter() - self.started
        return [self.micro_batches, self.optimizer_steps, self.samples, self.skipped_steps, self.data_wait, elapsed]


HOST_FIELDS = ("micro_batches", "optimizer_steps", "samples", "skipped_steps", "data_wait", "elapsed")
# Per-rank row: the hardware readings, then this rank's own timing of the window.
RANK_KEYS = (*HW_KEYS, "step_time", "data_wait_fraction")


def gather_rows(accelerator: Accelerator, parts: dict[str, Tensor | list[float]]) -> list[dict[str, list[float]]]:
    """All-gather named float vectors from every rank: one collective, one device->host copy.

    Returns one ``{name: values}`` dict per rank. Must be called on every rank.
    """
    device = accelerator.device
    tensors = [torch.as_tensor(p, dtype=torch.float64).to(device).flatten() for p in parts.values()]
    sizes = [t.numel() for t in tensors]
    rows = accelerator.gather(torch.cat(tensors)[None]).cpu().tolist()  # the single host transfer
    out = []
    for row in rows:
        record, offset = {}, 0
        for name, size in zip(parts, sizes, strict=True):
            record[name] = row[offset:offset + size]
            offset += size
        out.append(record)
    return out


def combine(rows: list[dict[str, list[float]]]) -> dict[str, float]:
    """Cross-rank totals of a window: losses and sample sums add, maxima take the max."""
    micro = sum(r["host"][0] for r in rows)
    losses = {k: sum(r["loss"][i] for r in rows) / max(micro, 1) for i, k in enumerate(LOSS_NAMES)}
    sums = {k: sum(r["sums"][i] for r in rows) for i, k in enumerate(SUM_FIELDS)}
    maxes = {k: max(r["maxes"][i] for r in rows) for i, k in enumerate(MAX_FIELDS)}
    # Gradients are identical on every rank after DDP's all-reduce: rank 0's row speaks for all.
    g, steps = rows[0]["grad"], max(rows[0]["host"][1], 1)
    out = {**losses, "grad_norm": g[0] / steps, "grad_norm_clipped": g[1] / steps, "clip_fraction": g[2] / steps,
           "grad_norm_max": g[3]}
    if sums["samples"] > 0:
        out.update(summarize(sums, maxes))
    return out


def gradient_detail(rows: list[dict[str, list[float]]], modules: list[str]) -> dict[str, float]:
    """grad_mean/std/max and per-module norms of the log step, undoing that step's clip."""
    detail = rows[0]["grad_detail"]
    scale = 1.0 / rows[0]["grad"][4]  # the stats were read after clipping; pre-clip = post-clip / coef
    row = dict(zip(GRAD_FIELDS, detail[:len(GRAD_FIELDS)], strict=True))
    out = summarize_grads(row, scale)
    for name, sq in zip(modules, detail[len(GRAD_FIELDS):], strict=True):
        out[f"grad_norm/{name}"] = scale * math.sqrt(max(sq, 0.0))
    return out


def hardware_record(rows: list[dict[str, list[float]]]) -> dict[str, float]:
    """Per-rank ``hw/rank{r}/<key>``, ``hw/max/`` and ``hw/mean/`` across ranks, the main process's
    own readings under bare names, and the straggler ratios ``hw/imbalance_*`` (max/min over ranks).

    Readings a rank does not have (NaN: no GPU, no NVML) are left out rather than logged as 0.
    """
    record: dict[str, float] = {}
    per_key: dict[str, list[float]] = {}
    for rank, row in enumerate(rows):
        for key, value in zip(RANK_KEYS, row["hw"], strict=True):
            if math.isfinite(value):
                record[f"hw/rank{rank}/{key}"] = value
                per_key.setdefault(key, []).append(value)
                if rank == 0:
                    record[key] = value
    for key, values in per_key.items():
        record[f"hw/max/{key}"] = max(values)
        record[f"hw/mean/{key}"] = sum(values) / len(values)
    peak = per_key.get("torch_peak_mb") or per_key.get("peak_rss_mb") or []
    for name, values in (("peak_memory", peak), ("step_time", per_key.get("step_time", []))):
        if len(values) == len(rows) and min(values) > 0:
            record[f"hw/imbalance_{name}"] = max(values) / min(values)
    return record
