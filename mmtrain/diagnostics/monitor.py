"""The rules during training, on the main process: :class:`DiagnosticsMonitor` watches every record the
loggers get and reports each finding once (printed, logged as an event, sent as an alert, listed in
the summary)."""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mmtrain.config import Config, DiagnosticsConfig
from mmtrain.diagnostics.history import Dropped, Finding, History, LrSchedule, RunContext, as_number
from mmtrain.diagnostics.rules import RULES
from mmtrain.loggers import Loggers


def _kept(key: str) -> bool:
    """The metrics the rules read (per-rank and per-module columns are left out: the rules use
    the max/mean/imbalance columns)."""
    return key == "hw/mean/step_time" or not key.startswith(
        ("hw/rank", "hw/mean/", "grad_norm/", "learning_rate/", "media/", "diagnostics/"))


def _whole(key: str) -> bool:
    """Epoch metrics arrive once per epoch and the epoch rules compare against every earlier epoch:
    the monitor keeps them whole."""
    return key.startswith(("val/", "epoch_", "val_train"))


def event(finding: Finding) -> dict[str, float]:
    """The record a finding is logged as: ``diagnostics/<rule>`` = 1 and each piece of evidence as
    ``diagnostics/<rule>/<name>`` (scalars, so that every logger can take them)."""
    return {f"diagnostics/{finding.rule}": 1.0,
            **{f"diagnostics/{finding.rule}/{k}": float(v) for k, v in finding.evidence.items()}}


class DiagnosticsMonitor:
    """The rules during training: after each logged record (:meth:`observe`), every rule that has
    not fired yet is judged on the recent history. A rule fires once per run: ``emit`` gets the
    finding (to alert and print it), its :func:`event` is returned to be logged at that step, and
    :meth:`findings` lists it for the summary.

    Only a tail of each training series is kept (the rules look back at most ``window`` records or
    ``n`` in a row), with what the rules need from the values before it (:class:`Dropped`), so the
    cost per log step does not grow with the run. Epoch series are kept whole (one value per epoch).
    Only a finding at the step just logged is taken: the rule did not hold at any earlier step when
    that step was logged, so an earlier hit can only come from a look-back the tail has cut. The
    state (findings and tails) is saved with each checkpoint, so a resumed run neither repeats a
    finding nor forgets the records before it.
    """

    def __init__(self, thresholds: DiagnosticsConfig, context: RunContext,
                 emit: Callable[[Finding], None] = lambda finding: None, active: bool = True) -> None:
        self.thresholds, self.context, self.emit, self.active = thresholds, context, emit, active
        t = thresholds
        self._tail = 1 + max(t.window, t.min_logs, t.vanishing_logs, t.latent_mean_logs, t.dominance_logs)
        self._steps: dict[str, deque[int]] = {}
        self._values: dict[str, deque[float]] = {}
        self._first: dict[str, float] = {}
        self._dropped: dict[str, Dropped] = {}
        self._fired: dict[str, Finding] = {}

    def _add(self, key: str, step: int, value: float) -> None:
        if key not in self._values:
            length = None if _whole(key) else self._tail
            self._steps[key], self._values[key] = deque(maxlen=length), deque(maxlen=length)
        values = self._values[key]
        if values.maxlen is not None and len(values) == values.maxlen:
            d, old = self._dropped.get(key, Dropped()), values[0]
            self._dropped[key] = Dropped(d.count + 1, float(np.fmin(d.low, old)),
                                         d.total + (old if math.isfinite(old) else 0.0))
        if key not in self._first and math.isfinite(value):
            self._first[key] = value
        self._steps[key].append(step)
        values.append(value)

    def observe(self, record: Mapping[str, Any], step: int) -> dict[str, float]:
        """Add ``record`` (logged at ``step``) and judge the rules; returns the events of the new
        findings, to log at the same step (``{}`` when none fired)."""
        if not self.active:
            return {}
        for key, raw in record.items():
            if _kept(key) and (value := as_number(raw)) is not None:
                self._add(key, step, value)
        history = History({k: (np.asarray(self._steps[k], dtype=np.int64), np.asarray(self._values[k]))
                           for k in self._values}, self._first, self._dropped)
        events: dict[str, float] = {}
        for name, rule in RULES.items():
            if name in self._fired:
                continue
            finding = rule(history, self.thresholds, self.context)
            if finding is not None and finding.step == step:
                self._fired[name] = finding
                self.emit(finding)
                events.update(event(finding))
        return events

    def findings(self) -> list[dict[str, Any]]:
        """Every finding so far, as JSON-able dicts in step order (for ``summary.json``)."""
        return [f.to_dict() for f in sorted(self._fired.values(), key=lambda f: (f.step, f.rule))]

    def state_dict(self) -> dict[str, Any]:
        return {"fired": self.findings(), "first": self._first,
                "dropped": {k: asdict(d) for k, d in self._dropped.items()},
                "series": {k: [list(self._steps[k]), list(self._values[k])] for k in self._values}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._fired = {f["rule"]: Finding(**f) for f in state.get("fired", [])}
        self._first = dict(state.get("first", {}))
        self._dropped = {k: Dropped(**d) for k, d in state.get("dropped", {}).items()}
        for key, (steps, values) in state.get("series", {}).items():
            length = None if _whole(key) else self._tail
            self._steps[key], self._values[key] = deque(steps, maxlen=length), deque(values, maxlen=length)


def build_diagnostics(is_main: bool, cfg: Config, total_steps: int, world_size: int,
                      loggers: Loggers) -> DiagnosticsMonitor:
    """The run's monitor, watching every record the main process logs. A finding is printed once,
    sent as an alert (``diagnostics.alerts``; W&B rate-limits by title), and logged as its event.
    Inactive on the other ranks and with ``diagnostics.enabled`` false (its state is still saved)."""
    t = cfg.diagnostics
    context = RunContext({f"loss_{k.removesuffix('_loss_weight')}": float(v) for k, v in asdict(cfg.model).items()
                          if k.endswith("_loss_weight")},
                         LrSchedule(cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, total_steps), world_size)

    def emit(finding: Finding) -> None:
        tqdm.write(f"mmtrain: diagnostics: {finding.message}", file=sys.stdout)
        if t.alerts:
            level = "WARN" if finding.severity == "warning" else "INFO"
            loggers.alert(f"mmtrain: {finding.rule}", finding.message, level, 60.0 * t.alert_wait_minutes)

    monitor = DiagnosticsMonitor(t, context, emit, active=is_main and t.enabled)
    loggers.observe(monitor.observe)
    return monitor
