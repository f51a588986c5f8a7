"""The telemetry windows: per-rank sums since the last log step (the log window) or the epoch's start
(the epoch window), and :func:`combine`, their cross-rank totals.

Between log steps nothing here touches the host: losses, metric sums and gradient norms are added
into device tensors, counts are Python ints. :meth:`Window.columns` is what a rank hands to
:func:`mmtrain.distributed.gather_named` at a log step; :func:`combine` builds the record's losses,
gradient norms and sample metrics from the gathered rows with plain Python.
"""

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from mmtrain.distributed import Part
from mmtrain.metrics import MAX_FIELDS, SUM_FIELDS, summarize
from mmtrain.model import loss_names

# A window's gradient columns: sums over its optimizer steps of the pre-clip norm, the post-clip
# norm and the clipped-step indicator; the largest pre-clip norm; the last step's clip coefficient.
GRAD_WINDOW = ("grad_norm_sum", "grad_norm_clipped_sum", "clipped_steps", "grad_norm_max", "clip_coef")


def micro_batch_rows(losses: dict[str, Tensor], batch_size: int, stats: tuple[Tensor, Tensor] | None
                     ) -> tuple[Tensor, int, Tensor | None, Tensor | None]:
    """What one micro-batch adds to a window: ``(loss row (len(loss_names()),) weighted by its
    samples, batch_size, sample sums (len(SUM_FIELDS),) or None, sample maxima (len(MAX_FIELDS),)
    or None)``, float64, on device. Computed once per micro-batch for both windows."""
    # Weighted by the micro-batch's samples: equal weights while every micro-batch has the same
    # size (always, within one layout: Accelerate's even batches), and still the per-sample mean
    # when an elastic resume or the OOM remedy changed the micro-batch size mid-window.
    loss_row = torch.stack([losses[k].detach() for k in loss_names()]).double() * batch_size
    if stats is None:
        return loss_row, batch_size, None, None
    sums, maxes = stats  # per-sample rows over SUM_FIELDS / MAX_FIELDS
    return loss_row, batch_size, sums.sum(dim=0), maxes.amax(dim=0)


def step_row(grad_norm: Tensor, max_norm: float) -> dict[str, Tensor]:
    """One optimizer step's gradient row, float64 0-d tensors on device: the pre-clip ``norm``
    ``clip_grad_norm_`` returned, the clip coefficient ``coef`` exactly as torch computes it
    (max_norm / (norm + 1e-6), capped at 1), ``clipped_norm`` = norm x coef, ``clipped`` = 1 if it clipped."""
    norm = grad_norm.detach().double()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0) if math.isfinite(max_norm) else torch.ones_like(norm)
    return {"norm": norm, "coef": coef, "clipped_norm": norm * coef, "clipped": (coef < 1.0).double()}


class Window:
    """Sums over the micro-batches and optimizer steps since ``reset`` on one rank."""

    _COUNTS = ("micro_batches", "optimizer_steps", "samples", "skipped_steps", "data_wait")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # The window's clock counts training time only: it starts paused (set-up, W&B's start-up and
        # a resume's loading are not step time) and is paused for validation and the epoch's checkpoint.
        self._since: float | None = None
        self.reset()

    def reset(self) -> None:
        f64 = {"dtype": torch.float64, "device": self.device}
        self.loss_sum = torch.zeros(len(loss_names()), **f64)
        self.sample_sums = torch.zeros(len(SUM_FIELDS), **f64)
        self.sample_maxes = torch.full((len(MAX_FIELDS),), -math.inf, **f64)
        self.grad = {k: torch.zeros((), **f64) for k in GRAD_WINDOW}
        self.grad["clip_coef"] = torch.ones((), **f64)
        self.micro_batches = self.optimizer_steps = self.samples = self.skipped_steps = 0
        self.data_wait = 0.0
        self._elapsed = 0.0
        if self._since is not None:
            self._since = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of training time in this window (wall clock while not paused)."""
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self._elapsed + running

    @property
    def running(self) -> bool:
        return self._since is not None

    def pause(self) -> None:
        self._elapsed, self._since = self.elapsed(), None

    def resume(self) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints: a resumed run continues the window instead of logging a partial one."""
        return {"loss_sum": self.loss_sum.cpu(), "sample_sums": self.sample_sums.cpu(),
                "sample_maxes": self.sample_maxes.cpu(), "grad": {k: v.cpu() for k, v in self.grad.items()},
                **{k: getattr(self, k) for k in self._COUNTS}, "elapsed": self.elapsed(),
                "loss_weighting": "samples"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("loss_sum", "sample_sums", "sample_maxes"):
            setattr(self, k, state[k].to(self.device))
        if state.get("loss_weighting") != "samples" and state["micro_batches"]:
            # Saved by an mmtrain that summed micro-batch means: equal micro-batches then, so this
            # is the same sum weighted by samples.
            self.loss_sum *= state["samples"] / state["micro_batches"]
        self.grad = {k: v.to(self.device) for k, v in state["grad"].items()}
        for k in self._COUNTS:
            setattr(self, k, state[k])
        self._elapsed, self._since = state["elapsed"], None  # the time spent down is not step time

    @staticmethod
    def merged_state(states: list[dict[str, Any]]) -> dict[str, Any]:
        """Several ranks' :meth:`state_dict` as one: losses, sample sums, micro-batches and samples
        add up, maxima take the max. Optimizer-step counts, gradient columns and timings are the first
        rank's: every rank counts the same steps and sees the same all-reduced gradient (``combine``
        reads rank 0's too), and timings are per rank."""
        first = states[0]
        return {**first,
                "loss_sum": sum(s["loss_sum"] for s in states), "sample_sums": sum(s["sample_sums"] for s in states),
                "sample_maxes": torch.stack([s["sample_maxes"] for s in states]).amax(dim=0),
                "micro_batches": sum(s["micro_batches"] for s in states), "samples": sum(s["samples"] for s in states)}

    def add_micro_batch(self, losses: dict[str, Tensor], batch_size: int,
                        stats: tuple[Tensor, Tensor] | None = None) -> None:
        self.add_rows(*micro_batch_rows(losses, batch_size, stats))

    def add_rows(self, loss_row: Tensor, batch_size: int, sums_row: Tensor | None, maxes_row: Tensor | None) -> None:
        """Add one micro-batch's reduced rows (:func:`micro_batch_rows`)."""
        self.loss_sum += loss_row
        if sums_row is not None:
            self.sample_sums += sums_row
            torch.maximum(self.sample_maxes, maxes_row, out=self.sample_maxes)
        self.micro_batches += 1
        self.samples += batch_size

    def add_optimizer_step(self, grad_norm: Tensor, max_norm: float) -> None:
        """``grad_norm`` is the pre-clip norm ``clip_grad_norm_`` returned; the clip coefficient
        is recomputed exactly as torch does (max_norm / (norm + 1e-6), capped at 1)."""
        self.add_step_row(step_row(grad_norm, max_norm))

    def add_step_row(self, row: dict[str, Tensor]) -> None:
        """Add one optimizer step's gradient row (:func:`step_row`)."""
        g = self.grad
        g["grad_norm_sum"] = g["grad_norm_sum"] + row["norm"]
        g["grad_norm_clipped_sum"] = g["grad_norm_clipped_sum"] + row["clipped_norm"]
        g["clipped_steps"] = g["clipped_steps"] + row["clipped"]
        g["grad_norm_max"] = torch.maximum(g["grad_norm_max"], row["norm"])
        g["clip_coef"] = row["coef"]
        self.optimizer_steps += 1

    def columns(self) -> dict[str, Part]:
        """Everything this rank contributes to the window's record, by name."""
        counts = {k: float(getattr(self, k)) for k in self._COUNTS}
        counts["elapsed"] = self.elapsed()
        return {"loss": (loss_names(), self.loss_sum), "sums": (SUM_FIELDS, self.sample_sums),
                "maxes": (MAX_FIELDS, self.sample_maxes), "grad": self.grad, "counts": counts}


def combine(rows: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """Cross-rank totals of a window: losses and sample sums add, maxima take the max."""
    samples = sum(r["counts"]["samples"] for r in rows)
    losses = {k: sum(r["loss"][k] for r in rows) / max(samples, 1) for k in rows[0]["loss"]}
    sums = {k: sum(r["sums"][k] for r in rows) for k in SUM_FIELDS}
    maxes = {k: max(r["maxes"][k] for r in rows) for k in MAX_FIELDS}
    # The clipped norms come from clip_grad_norm_, which returns the full gradient's norm on every
    # rank under DDP (identical gradients) and FSDP (it reduces across shards): rank 0's row speaks for all.
    g, steps = rows[0]["grad"], max(rows[0]["counts"]["optimizer_steps"], 1)
    out = {**losses, "grad_norm": g["grad_norm_sum"] / steps, "grad_norm_clipped": g["grad_norm_clipped_sum"] / steps,
           "clip_fraction": g["clipped_steps"] / steps, "grad_norm_max": g["grad_norm_max"]}
    if sums["samples"] > 0:
        out.update(summarize(sums, maxes))
    return out


class Windows:
    """The per-rank part of the telemetry state (both windows), for the checkpoint's rank file."""

    def __init__(self, device: torch.device) -> None:
        self.log, self.epoch = Window(device), Window(device)

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.log.state_dict(), "epoch_window": self.epoch.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log.load_state_dict(state["window"])
        self.epoch.load_state_dict(state["epoch_window"])

    def pause(self) -> None:
        """Stop both windows' clocks: what follows is not training time."""
        self.log.pause()
        self.epoch.pause()

    def resume(self) -> None:
        """Start (or restart) both windows' clocks; idempotent."""
        self.log.resume()
        self.epoch.resume()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Both clocks stopped inside the block, then back to running only if they were."""
        running = self.log.running
        self.pause()
        try:
            yield
        finally:
            if running:
                self.resume()

    def load_resharded_state(self, saved: list[dict[str, Any]], resharding: Any) -> None:
        """A checkpoint of another process count (``resharding``: mmtrain.checkpoint.Resharding):
        every saved rank's windows merged into the new rank 0, empty windows on the others, so that
        the cross-rank sums, counts and maxima :func:`combine` makes of them are those saved."""
        for window, key in ((self.log, "window"), (self.epoch, "epoch_window")):
            window.reset()
            if resharding.rank == 0:
                window.load_state_dict(Window.merged_state([s[key] for s in saved]))
