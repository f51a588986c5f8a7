"""What the rules read: a run's history by metric (:class:`History`, whole or the tail the training
monitor keeps), the configured LR schedule and loss weights (:class:`RunContext`), and what a rule
returns (:class:`Finding`). Light on purpose (numpy and the standard library)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# The report's panels a finding links to (``index.html#panel-<panel>``).
PANELS = ("loss", "components", "latent", "gradients", "hardware", "lr", "captions", "throughput")

Series = tuple[np.ndarray, np.ndarray]  # (optimizer steps, int64), (values, float64; NaN = not finite)


@dataclass(frozen=True)
class Finding:
    """One rule that fired: at optimizer ``step``, with the numbers that made it fire (``evidence``:
    the values read and the threshold they crossed) and the report panel that shows them."""

    rule: str
    step: int
    severity: str  # "warning": likely a problem to fix; "info": worth a look
    message: str
    evidence: dict[str, float]
    panel: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_number(value: Any) -> float | None:
    """A record value as a float (metrics.jsonl writes NaN as null: that is NaN again), or None
    for what is not a number (media references, text)."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


@dataclass(frozen=True)
class Dropped:
    """What a tail of a series no longer holds: how many values came before it, their minimum and sum."""

    count: int = 0
    low: float = math.inf
    total: float = 0.0


class History:
    """A run's logged values by metric: ``series(name)`` is (steps, values) in step order.

    Built from records (``metrics.jsonl`` lines, or what the trainer logs): a training-window
    record and an epoch record may share a step, and any record may miss any metric. The training
    monitor holds only the tail of each series; ``first`` (the first finite value ever logged) and
    ``dropped`` (what came before the tail) keep what the rules need from the rest, and a rule that
    looks back ``window`` records judges a tail only where its look-back is whole.
    """

    def __init__(self, columns: Mapping[str, Series], first: Mapping[str, float] | None = None,
                 dropped: Mapping[str, Dropped] | None = None) -> None:
        self._columns = dict(columns)
        if first is None:
            first = {}
            for name, (_, v) in self._columns.items():
                finite = v[np.isfinite(v)]
                if len(finite):
                    first[name] = float(finite[0])
        self.first = dict(first)
        self.dropped = dict(dropped or {})

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> History:
        steps: dict[str, list[int]] = {}
        values: dict[str, list[float]] = {}
        for record in records:
            step = record.get("step")
            if not isinstance(step, int):
                continue
            for key, raw in record.items():
                if key != "step" and (value := as_number(raw)) is not None:
                    steps.setdefault(key, []).append(step)
                    values.setdefault(key, []).append(value)
        return cls({k: (np.asarray(steps[k], dtype=np.int64), np.asarray(values[k], dtype=np.float64))
                    for k in steps})

    def series(self, name: str) -> Series:
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
        return self._columns.get(name, empty)

    def names(self) -> list[str]:
        return list(self._columns)

    def start(self, name: str, look_back: int, minimum: int = 0) -> int:
        """The first index of ``series(name)`` a rule that looks back ``look_back`` values may judge:
        ``minimum`` in a whole series, ``look_back`` in a tail (whose earlier values are gone)."""
        return max(minimum, look_back) if self.dropped.get(name, Dropped()).count else minimum

    def aligned(self, *names: str) -> tuple[np.ndarray, ...]:
        """(steps, values of each name) at the steps where every one of ``names`` was logged."""
        steps = self.series(names[0])[0]
        for name in names[1:]:
            steps = np.intersect1d(steps, self.series(name)[0])
        out = [steps]
        for name in names:
            s, v = self.series(name)
            out.append(v[np.searchsorted(s, steps)] if len(steps) else v[:0])
        return tuple(out)


@dataclass(frozen=True)
class LrSchedule:
    """The configured schedule (mmtrain.optim.build_scheduler): linear warmup from 0 to ``peak`` over
    ``warmup`` optimizer steps, then a half cosine to ``floor`` at step ``total``."""

    peak: float
    floor: float
    warmup: int
    total: int

    def at(self, step: int) -> float:
        """The rate optimizer step ``step`` (1-based) runs with: the schedule at index step - 1,
        the schedule sized to total - 1 indices (transformers' cosine-with-min-lr formula)."""
        i, decay = step - 1, max(1, self.total - 1 - self.warmup)
        if i < self.warmup:
            return self.peak * i / max(1, self.warmup)
        progress = (i - self.warmup) / decay
        rate = self.floor / self.peak if self.peak else 0.0
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.peak * max(0.0, factor * (1 - rate) + rate)


@dataclass(frozen=True)
class RunContext:
    """What the rules need besides the history: each loss component's weight in ``total_loss``
    (``{"loss_image": 1.0, ...}``), the configured LR schedule (None: unknown, not judged) and
    the number of ranks."""

    loss_weights: Mapping[str, float]
    lr_schedule: LrSchedule | None = None
    world_size: int = 1

    @classmethod
    def from_config(cls, config: Mapping[str, Any], history: History | None = None) -> RunContext:
        """From a run's ``config.yaml`` (nested sections). The schedule's length is not in the config
        (it depends on the data), so it is read off the history: ``epoch = step / steps_per_epoch``."""
        model, optim, train = (config.get(s) or {} for s in ("model", "optim", "train"))
        weights = {f"loss_{k.removesuffix('_loss_weight')}": float(v) for k, v in model.items()
                   if k.endswith("_loss_weight")}
        schedule = None
        if history is not None and "lr" in optim:
            steps, epochs = history.series("epoch")
            per_epoch = [s / e for s, e in zip(steps, epochs, strict=True) if e > 0]
            if per_epoch:
                total = round(float(np.median(per_epoch))) * int(train.get("epochs", 1))
                if train.get("max_steps"):
                    total = min(total, int(train["max_steps"]))
                schedule = LrSchedule(float(optim["lr"]), float(optim.get("min_lr", 0.0)),
                                      int(optim.get("warmup_steps", 0)), total)
        ranks = {name.split("/")[1] for name in (history.names() if history else []) if name.startswith("hw/rank")}
        return cls(weights, schedule, max(1, len(ranks)))
