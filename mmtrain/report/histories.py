"""One run's ``metrics.jsonl`` as the report uses it: parsed lines, the run's rows of ``history.csv``
(every logged number, never downsampled), numeric columns by metric, and the series drawn."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orjson


def parse_lines(text: str) -> tuple[list[dict[str, Any]], list[str], int]:
    """(records, their lines, lines skipped). A line that is not a JSON object with an integer ``step``
    is skipped: the last line of a run in progress may be cut off mid-write."""
    records, lines, skipped = [], [], 0
    loads = orjson.loads  # 5x json.loads: parsing is most of a report's time on a big sweep
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = loads(line)
        except ValueError:
            skipped += 1
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            skipped += 1
            continue
        records.append(rec)
        lines.append(line)
    return records, lines, skipped


def csv_field(text: str) -> str:
    """One CSV field (RFC 4180 quoting, only when needed)."""
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _csv_value(value: Any) -> str | None:
    """A logged value as history.csv writes it: numbers as in metrics.jsonl (Python's repr, which is what
    json wrote), a logged NaN (JSON null) as ``nan``; text, booleans and media references are not
    numbers (as for mmtrain.diagnostics): None."""
    if value is None:
        return "nan"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return None


def history_rows(run_name: str, records: Sequence[dict[str, Any]], lines: Sequence[str],
                 plain: Sequence[bool] | None = None, nulls: bool = True) -> str:
    """The run's rows of history.csv (``run,step,metric,value``), every numeric value of every line.

    Most lines hold only numbers, and json wrote each number as ``repr`` does, so those lines are
    turned into rows with a few string operations on the line itself instead of formatting every
    number again (several times faster; at 100 runs x 10,000 lines it is 80 million rows). Lines with
    anything else (media references, text, booleans, names that json escapes) are written from the
    parsed values, with the same result. ``plain[i]`` says line i is one of the first kind (columns_of
    knows it from the parsed values); without it each line's text is checked. ``nulls`` False says no
    plain line holds a null (a logged NaN), which spares a pass over the text."""
    run = csv_field(run_name)
    if plain is None:
        plain = [_plain_text(line) for line in lines]
    out: list[str] = []
    for rec, line, simple in zip(records, lines, plain, strict=True):
        prefix = f"{run},{rec['step']},"
        if simple and line.startswith('{"step": '):
            parts = line[1:-1].replace('": ', ",").split(', "')[1:]
            if parts:
                out.append(prefix + ("\n" + prefix).join(parts) + "\n")
            continue
        for k, v in rec.items():
            if k == "step":
                continue
            value = _csv_value(v)
            if value is not None:
                out.append(f"{prefix}{csv_field(k)},{value}\n")
    text = "".join(out)
    # JSON null (a logged NaN) went through the fast path as the word null.
    return text.replace(",null\n", ",nan\n") if nulls else text


def _plain_text(line: str) -> bool:
    """Whether a metrics.jsonl line is a flat object of numbers whose names need no escaping, judged
    on its text: no string, object, list, boolean or escape in it, and every comma separates entries."""
    return (line.startswith('{"step": ') and line.endswith("}") and line.find("{", 1) < 0 and '": "' not in line
            and "[" not in line and "\\" not in line and ": true" not in line and ": false" not in line
            and line.count(",") == line.count(', "'))


def _plain_name(key: str) -> bool:
    """A metric name json writes as it is and that needs no quoting in CSV."""
    return key.isascii() and key.isprintable() and not any(c in key for c in ',"\\')


_NUMBER_TYPES = {int, float, type(None)}


def columns_of(records: Sequence[dict[str, Any]]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                                                            dict[str, list[tuple[int, str]]], np.ndarray, bool]:
    """Every numeric metric of one run's records as ``{name: (steps int64, values float64)}`` in file
    order (a logged NaN, JSON null, is NaN; text, booleans and media references are not numbers), the
    media references ``{key: [(step, path in the run folder)]}``, which records hold only numbers under
    plain names (history_rows' fast path), and whether any of those holds a null.

    Lines with the same keys (every training-window line of a run) become one 2-D array at once
    instead of value by value; a group holding anything but numbers (the epoch-end lines with media
    references) is read column by column."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(tuple(rec), []).append(i)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    media: dict[str, list[tuple[int, str]]] = {}
    plain = np.zeros(len(records), dtype=bool)
    nulls = False
    for keys, idx in groups.items():
        rows = [list(records[i].values()) for i in idx]
        index = np.asarray(idx, dtype=np.int64)
        table = None
        # Exactly numbers and nulls (numpy would also take "1.5" and True as numbers, json does not).
        if set(map(type, itertools.chain.from_iterable(rows))) <= _NUMBER_TYPES:
            table = np.array(rows, dtype=np.float64)  # None (a logged NaN) becomes nan
        if table is not None:
            if all(map(_plain_name, keys)):
                plain[index] = True
                nulls = nulls or bool(np.isnan(table).any())
            for j, k in enumerate(keys):
                parts.setdefault(k, []).append((index, table[:, j]))
            continue
        for j, k in enumerate(keys):
            values = [row[j] for row in rows]
            numeric = [v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values]
            if any(numeric):
                mask = np.asarray(numeric)
                parts.setdefault(k, []).append(
                    (index[mask], np.array([v for v, n in zip(values, numeric, strict=True) if n], dtype=np.float64)))
            for i, v in zip(idx, values, strict=True):
                if isinstance(v, dict) and isinstance(v.get("path"), str) and "_type" in v:
                    media.setdefault(k, []).append((records[i]["step"], v["path"]))
    steps_of = np.asarray([rec["step"] for rec in records], dtype=np.int64)
    columns = {}
    for k, chunks in parts.items():
        if k == "step":
            continue
        where = np.concatenate([w for w, _ in chunks])
        values = np.concatenate([v for _, v in chunks])
        order = np.argsort(where, kind="stable")
        columns[k] = (steps_of[where[order]], values[order])
    for k in media:
        media[k].sort()
    return columns, media, plain, nulls


def drawn_series(columns: dict[str, tuple[np.ndarray, np.ndarray]], keep: Callable[[str], bool]
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The columns ``keep`` selects, for drawing: one value per step (should a file ever hold a step
    twice, the later line wins, as a resume would have it), steps as int32 and values as float32 (half
    of what a worker sends back and the report holds for 100 runs; a chart needs no more)."""
    series = {}
    for k, (steps, values) in columns.items():
        if not keep(k) or not len(steps):
            continue
        if len(steps) > 1 and np.any(np.diff(steps) <= 0):
            order = np.argsort(steps, kind="stable")
            steps, values = steps[order], values[order]
            later = np.append(steps[1:] != steps[:-1], True)
            steps, values = steps[later], values[later]
        # metrics.jsonl writes ±inf as ±1e308, beyond float32; drawn as gaps, like NaN (the CSV keeps them).
        drawn = np.where(np.abs(values) < 3e38, values, np.nan).astype(np.float32)
        series[k] = (steps.astype(np.int32) if steps[-1] < 2**31 else steps, drawn)
    return series
