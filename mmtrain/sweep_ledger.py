"""The ledger of ``mmtrain sweep``, ``SWEEP_DIR/sweep.jsonl``.

A header line (the spec as parsed, its sha256, the seed, the overrides), then one line per trial event, each
fsynced; the last line of a trial wins. A line torn by a kill is skipped when read, and the next line written
starts on a line of its own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmtrain.errors import UserError

if TYPE_CHECKING:
    from mmtrain.sweep_spec import SweepSpec

LEDGER = "sweep.jsonl"


def append(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, fsynced: a sweep killed at any moment keeps every line written before. After a line torn by
    a kill (no final newline), a newline first, so this line is not glued to the torn one."""
    with path.open("ab+") as f:  # appends, wherever it has read
        torn = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((("\n" if torn else "") + json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def read_ledger(path: Path) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """(the header, {trial: its last line}); a line torn by a kill is skipped."""
    header, trials = None, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            if "trial" in record:
                trials[record["trial"]] = record
            elif header is None:
                header = record
    return header, trials


def check_ledger(path: Path, spec: SweepSpec, seed: int, overrides: list[str]) -> dict[int, dict[str, Any]]:
    """The trials an earlier command recorded in ``path``; UserError if it ran another spec, seed or overrides."""
    header, trials = read_ledger(path)
    if header is None:
        return trials
    fix = f"use another --out, or delete {path} to start this sweep over"
    if header.get("spec_sha256") != spec.digest:
        raise UserError(f"{path} records another sweep spec ({header.get('spec_file')}, sha256 "
                        f"{str(header.get('spec_sha256'))[:12]}) than {spec.path} (sha256 {spec.digest[:12]}); {fix}")
    if header.get("overrides") != overrides:
        raise UserError(f"{path} was run with the overrides {header.get('overrides')}, not {overrides}; repeat them "
                        f"after -- to continue it, or {fix}")
    if header.get("seed") != seed:
        raise UserError(f"{path} was run with --seed {header.get('seed')}; repeat it to continue, or {fix}")
    return trials


def write_header(path: Path, spec: SweepSpec, seed: int, overrides: list[str]) -> None:
    if read_ledger(path)[0] is None:
        append(path, {"sweep": spec.name, "spec_file": str(spec.path), "spec_sha256": spec.digest, "spec": spec.raw,
                      "method": spec.method, "metric": {"name": spec.metric, "goal": spec.goal}, "seed": seed,
                      "overrides": overrides, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
