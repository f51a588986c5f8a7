"""The logging interface: the media types, the no-op sink ``BaseLogger`` and the ``Loggers`` container.

The trainer holds one ``Loggers`` and never talks to a sink directly. The container owns the rules
that hold for every sink: the step order, which sinks get media, and the safety net that switches
a failing sink off with one warning so that the others (and training) go on. Each sink
(``jsonl``, ``wandb``, ``tensorboard``, ``csv``) owns only its output.

Light on purpose: numpy and the standard library only, so that importing the interface never
pulls in wandb, tensorboard, torch or accelerate (their sinks import them when they open).
"""

import contextlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Image:
    """An image to log: (H, W) or (H, W, 3) uint8."""

    array: np.ndarray
    caption: str | None = None
    _png: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def png(self) -> bytes:
        """The image as PNG bytes, encoded once and shared by the sinks that write files (jsonl, W&B).

        zlib level 1, not PIL's default 6: a laptop reconstruction grid (200 x 530 RGB) encodes in
        about half the time, and its file is as small (99.4 against 99.8 KB). Lossless either way.
        """
        if self._png is None:
            from PIL import Image as PILImage  # only a run that logs media needs PIL

            buffer = io.BytesIO()
            PILImage.fromarray(self.array).save(buffer, format="PNG", compress_level=1)
            self._png = buffer.getvalue()
        return self._png


@dataclass
class Table:
    """A table to log; cells may be :class:`Image`, str or numbers."""

    columns: list[str]
    rows: list[list[Any]]


def is_media(value: Any) -> bool:
    return isinstance(value, (Image, Table))


def _describe(error: BaseException) -> str:
    """An exception on one line: wandb's messages span several, and a warning is one line to the user."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


class BaseLogger:
    """A logging sink that does nothing; sinks override what they need.

    ``takes_media``: the sink gets :class:`Image`/:class:`Table` values (the others never see them).
    ``essential``: the run cannot go on without this sink (its errors propagate instead of
    switching it off). Constructing a sink starts nothing; ``open`` does.
    """

    name: str = "base"
    takes_media: bool = False
    essential: bool = False

    def open(self, run_config: dict[str, Any], resume_step: int | None) -> None:
        """Start the sink. ``resume_step``: the optimizer step of the checkpoint this run continues
        from (None for a fresh run); the sink drops anything it holds for later steps."""

    def log(self, record: dict[str, Any], step: int) -> None:
        """Record ``record`` at optimizer ``step`` (media values only when ``takes_media``)."""

    def summary(self, values: dict[str, Any]) -> None:
        """The run's final (or failure) summary."""

    def alert(self, title: str, text: str, level: str, wait_seconds: float) -> None:
        """Notify the user now (a diagnostic finding); ``level`` is ``"INFO"``, ``"WARN"`` or ``"ERROR"``;
        an alert with the same title is not sent again within ``wait_seconds``. Sinks without
        notifications ignore it (the finding is in the records and the summary anyway)."""

    def flush(self) -> None:
        """Make what was logged durable (called before each checkpoint is committed)."""

    def close(self) -> None:
        """Finish the sink; called once, at the end of the run (or of a failed run)."""

    def report_lines(self) -> list[str]:
        """Lines for the end-of-run report saying where the output is; called after ``close``."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must carry for this sink to continue on resume (JSON-able)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what ``state_dict`` returned; called before ``open``."""


class Loggers:
    """The sinks of one run, in order; what the trainer holds. ``Loggers([])`` (non-main ranks) does nothing.

    Step order: steps must not decrease, and a step whose records were flushed is closed (W&B
    silently drops a record for an earlier step, and metrics.jsonl would get its lines out of
    order); a continued run starts with its checkpoint's step closed. Several ``log`` calls at the
    same step are allowed until the next ``flush``: they become one line (one W&B row).

    A sink that raises is switched off for the rest of the run with one warning, unless it is
    ``essential`` (metrics.jsonl: the checkpoint refers to its lines, so a full disk must stop the run).
    """

    def __init__(self, sinks: list[BaseLogger]) -> None:
        self.sinks = list(sinks)
        self._failed: dict[str, str] = {}  # sink name -> the call that failed (the sink is off)
        self._last_step = -1
        self._step_open = False  # the last step may still get records (not flushed yet)
        self._carried: dict[str, Any] = {}  # loaded states of sinks this session does not run
        self._observers: list[Callable[[dict[str, Any], int], dict[str, Any]]] = []

    def observe(self, observer: Callable[[dict[str, Any], int], dict[str, Any]]) -> None:
        """Show ``observer(record, step)`` every record logged from now on (media left out); what it
        returns (a diagnostic event, or ``{}``) is logged at the same step, to the sinks only."""
        self._observers.append(observer)

    def get(self, name: str) -> BaseLogger | None:
        return next((sink for sink in self.sinks if sink.name == name), None)

    def _active(self) -> list[BaseLogger]:
        return [sink for sink in self.sinks if sink.name not in self._failed]

    def _call(self, sink: BaseLogger, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:
            if sink.essential:
                raise
            # One line, once: a sink that failed is not trusted with more calls, and one warning
            # beats one per step. Its output so far stays where it is.
            self._failed[sink.name] = what
            warnings.warn(f"logger {sink.name}: {what} failed ({_describe(e)}); {sink.name} is off for the rest "
                          "of this run. metrics.jsonl has every record.", stacklevel=3)
            return None

    def open(self, run_config: dict[str, Any], resume_step: int | None = None) -> None:
        if resume_step is not None:
            # Steps before the checkpoint's are closed. Its own step stays open: a checkpoint saved at
            # an epoch's last step, before that epoch's validation, logs the epoch record there.
            self._last_step, self._step_open = resume_step, True
        for sink in self._active():
            self._call(sink, "open", lambda sink=sink: sink.open(run_config, resume_step))

    def log(self, record: dict[str, Any], step: int) -> None:
        """Send ``record`` at optimizer ``step`` to every sink; RuntimeError for a step out of order
        (a bug in the caller's order: no sink has been given the record)."""
        if not self.sinks:  # a non-main rank: nothing to order
            return
        last = self._last_step
        if step < last or (step == last and not self._step_open):
            raise RuntimeError(f"record for step {step} after step {last} was logged: the caller must read out "
                               f"late events before logging a later step (keys: {', '.join(sorted(record))})")
        self._last_step, self._step_open = step, True
        plain = {k: v for k, v in record.items() if not is_media(v)}
        for sink in self._active():
            sent = record if sink.takes_media else plain
            if sent:
                self._call(sink, "log", lambda sink=sink, sent=sent: sink.log(sent, step))
        for observer in self._observers:
            if plain and (event := observer(plain, step)):
                for sink in self._active():
                    self._call(sink, "log", lambda sink=sink, event=event: sink.log(event, step))

    def summary(self, values: dict[str, Any]) -> None:
        for sink in self._active():
            self._call(sink, "summary", lambda sink=sink: sink.summary(values))

    def alert(self, title: str, text: str, level: str = "WARN", wait_seconds: float = 300.0) -> None:
        for sink in self._active():
            self._call(sink, "alert", lambda sink=sink: sink.alert(title, text, level, wait_seconds))

    def flush(self) -> None:
        """Make every sink's records durable; the last step is closed from now on."""
        self._step_open = False
        for sink in self._active():
            self._call(sink, "flush", sink.flush)

    def close(self) -> None:
        for sink in self.sinks:
            if sink.name not in self._failed:
                self._call(sink, "close", sink.close)
            elif self._failed[sink.name] != "close":
                # Release what a switched-off sink still holds (an open file, a writer thread); it
                # failed once already and was warned about, so whatever this says is not news.
                with contextlib.suppress(Exception):
                    sink.close()

    def report_lines(self) -> list[str]:
        lines = []
        for sink in self.sinks:
            try:
                own = sink.report_lines()
            except Exception:  # the report must be printed; a sink that cannot describe itself says nothing
                own = []
            if sink.name in self._failed:
                own = [f"{line}  (incomplete: {sink.name} failed in {self._failed[sink.name]})" for line in own]
            lines += own
        return lines

    def state_dict(self) -> dict[str, Any]:
        """``{sink name: its state}`` for the sinks that have any; JSON-able, for the checkpoint."""
        states = {}
        for sink in self.sinks:
            if sink.name in self._failed:
                # Still asked: what a sink needs to continue (the W&B run id) outlives its failure here.
                state = None
                with contextlib.suppress(Exception):
                    state = sink.state_dict()
            else:
                state = self._call(sink, "state_dict", sink.state_dict)
            if state:
                states[sink.name] = state
        return {**self._carried, **states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The states of sinks this session does not run are carried on unchanged: a session logged
        # without W&B must not cost the next one its W&B run id.
        present = {sink.name for sink in self.sinks}
        self._carried = {name: value for name, value in state.items() if name not in present}
        for sink in self._active():
            if state.get(sink.name):
                self._call(sink, "load_state_dict", lambda sink=sink: sink.load_state_dict(state[sink.name]))
