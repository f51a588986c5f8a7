"""The ``csv`` sink: ``output_dir/metrics.csv`` in long format, one row per number logged.

The header is ``step,name,value``; a key that first appears mid-run (an epoch record, an event)
is just more rows, so the file never needs a new header. Strings and media are not written
(metrics.jsonl has them). A wide table, one row per step and one column per key::

    import pandas as pd
    long = pd.read_csv("runs/x/metrics.csv")
    wide = long.pivot_table(index="step", columns="name", values="value", aggfunc="last")

(``aggfunc="last"``: a key logged twice at one step keeps its last value, as metrics.jsonl does.)
Non-finite values are written ``nan``/``inf``/``-inf``, which pandas reads as floats.

A continued run keeps the rows up to its checkpoint's step and drops the rest (the interrupted
attempt's later steps, which are trained and logged again, and a row torn by the kill).
"""

import csv
import io
import numbers
import os
from pathlib import Path
from typing import Any

from mmtrain.fsio import write_atomic
from mmtrain.loggers.base import BaseLogger

HEADER = ["step", "name", "value"]


def _number(value: numbers.Real) -> int | float:
    """A plain Python number: csv would write a bool as ``True``, which no reader takes for a number."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _row_step(line: str) -> int | None:
    """The step of one complete data row, or None for a torn or foreign line."""
    if not line.endswith("\n"):  # the last line, cut by a kill in the middle of a write
        return None
    try:
        (fields,) = list(csv.reader([line]))
        step, _name, value = fields
        float(value)
        return int(step)
    except ValueError:  # wrong number of fields, or a step/value that is not a number
        return None


def keep_rows_until(path: Path, last_step: int) -> int:
    """Rewrite ``path`` atomically with the header and its rows of steps <= ``last_step``; returns the
    rows dropped. A crash here leaves the old file or the new one."""
    lines = path.read_text().splitlines(keepends=True)
    kept, dropped = [], 0
    for line in lines[1:]:  # the header is written anew
        step = _row_step(line)
        if step is not None and step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    write_atomic(path, ",".join(HEADER) + "\n" + "".join(kept))
    return dropped


class CsvLogger(BaseLogger):
    """``metrics.csv`` (long format: step,name,value) in ``output_dir``."""

    name = "csv"

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / "metrics.csv"
        self._file: io.TextIOWrapper | None = None
        self._writer = None
        self._step, self._written = None, set()  # the names written at the current step

    def open(self, run_config: dict[str, Any], resume_step: int | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            keep_rows_until(self.path, resume_step)
        else:  # a fresh run starts a fresh file: nothing of an earlier run belongs in it
            write_atomic(self.path, ",".join(HEADER) + "\n")
        self._file = self.path.open("a", newline="")
        # "\n" line ends: keep_rows_until and readers split on them (csv's default is "\r\n").
        self._writer = csv.writer(self._file, lineterminator="\n")

    def log(self, record: dict[str, Any], step: int) -> None:
        if self._writer is None:
            return
        if step != self._step:
            self._step, self._written = step, set()
        # One row per (step, name), as metrics.jsonl has one value: records of one step share keys
        # such as `epoch` (a log step that ends an epoch), with the same value.
        rows = [[step, key, _number(value)] for key, value in record.items()
                if isinstance(value, numbers.Real) and key not in self._written]
        self._written.update(key for _, key, _ in rows)
        self._writer.writerows(rows)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self.flush()
        file, self._file, self._writer = self._file, None, None
        if file is not None:
            file.close()

    def report_lines(self) -> list[str]:
        return [f"{'CSV:':<12}{self.path}"]
