"""The ``tensorboard`` sink: TensorBoard event files in ``output_dir/tensorboard/``.

Scalars keep the metrics.jsonl key names (``val/total_loss``: TensorBoard groups charts by the part
before the ``/``), at the optimizer step. Images are image summaries; a table is a markdown text
summary of its text and number cells, plus one image summary per image cell. Strings are skipped.

A continued run opens its writer with ``purge_step`` = the checkpoint's step + 1: TensorBoard then
discards the events an interrupted attempt wrote after the checkpoint, and the charts show the
steps as the continued run logs them again.
"""

import numbers
from pathlib import Path
from typing import Any

from mmtrain.errors import shell_word
from mmtrain.loggers.base import BaseLogger, Image, Table


def _scalar(value: Any) -> float | None:
    """A loggable number (ints, floats, numpy numbers, bools as 0/1), else None."""
    return float(value) if isinstance(value, numbers.Real) else None


def _cell(value: Any) -> str:
    """A table cell as markdown text: pipes and line breaks would end the cell or the row."""
    if isinstance(value, Image):
        return f"(image{': ' + value.caption if value.caption else ''})".replace("|", "\\|").replace("\n", " ")
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _dataformats(image: Image) -> str:
    return "HW" if image.array.ndim == 2 else "HWC"


class TensorBoardLogger(BaseLogger):
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``output_dir/tensorboard``."""

    name = "tensorboard"
    takes_media = True

    def __init__(self, output_dir: Path) -> None:
        self.log_dir = Path(output_dir) / "tensorboard"
        self._writer = None
        self._last_step = 0  # the step the summary is written at

    def open(self, run_config: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is imported only by a run that uses it

        self.log_dir.mkdir(parents=True, exist_ok=True)
        # purge_step writes a SessionLog.START at that step into the new event file; readers drop every
        # earlier-written event at or after it (the interrupted attempt's steps past the checkpoint).
        purge = resume_step + 1 if resume_step is not None else None
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        self._last_step = resume_step or 0

    def log(self, record: dict[str, Any], step: int) -> None:
        writer = self._writer
        if writer is None:
            return
        self._last_step = step
        for key, value in record.items():
            if isinstance(value, Image):
                writer.add_image(key, value.array, step, dataformats=_dataformats(value))
            elif isinstance(value, Table):
                self._add_table(key, value, step)
            elif (number := _scalar(value)) is not None:
                writer.add_scalar(key, number, step)

    def _add_table(self, key: str, table: Table, step: int) -> None:
        self._writer.add_text(key, markdown_table(table.columns, table.rows), step)
        image_columns = {j for row in table.rows for j, c in enumerate(row) if isinstance(c, Image)}
        for i, row in enumerate(table.rows):
            for j, cell in enumerate(row):
                if isinstance(cell, Image):
                    # One image column (the usual case): KEY/ROW; several: KEY/ROW/COLUMN.
                    tag = f"{key}/{i}" if len(image_columns) == 1 else f"{key}/{i}/{table.columns[j]}"
                    self._writer.add_image(tag, cell.array, step, dataformats=_dataformats(cell))

    def summary(self, values: dict[str, Any]) -> None:
        """Numbers as ``summary/KEY`` scalars and everything else as one markdown table (``summary``
        text), at the last step logged: TensorBoard has no run summary of its own."""
        if self._writer is None:
            return
        others = []
        for key, value in values.items():
            if (number := _scalar(value)) is not None:
                self._writer.add_scalar(f"summary/{key}", number, self._last_step)
            else:
                others.append([key, value])
        if others:
            self._writer.add_text("summary", markdown_table(["key", "value"], others), self._last_step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def report_lines(self) -> list[str]:
        # "TensorBoard:" fills the 12-column label, so one space more than the other report lines.
        return [f"{'TensorBoard:':<12} {self.log_dir}  (view with: tensorboard --logdir {shell_word(self.log_dir)})"]
