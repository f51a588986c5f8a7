"""Read W&B offline run files (``run-*.wandb``) so tests can assert on what W&B really recorded.

The file is a LevelDB-style log: a 7-byte W&B header, then 32 KiB blocks of chunks, each with a
7-byte header (crc32c, length, type: FULL/FIRST/MIDDLE/LAST); chunks concatenate to serialized
``wandb.proto.wandb_internal_pb2.Record`` messages. (wandb >= 0.2x no longer ships a reader.)
"""

import json
import struct
import threading
from pathlib import Path

import wandb
from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    ident, magic, _version = struct.unpack("<4sHB", data[:_HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, "not a W&B run file"
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding at the end
            break
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = [chunk]
        elif kind == _MIDDLE:
            parts.append(chunk)
        elif kind == _LAST:
            parts.append(chunk)
            yield b"".join(parts)


def read_run(path: Path) -> dict:
    """{"run_id", "config": {key: value}, "history": [{key: value}], "summary": {key: value},
    "alerts": [{"title", "text", "level", "wait_duration"}]}."""
    import wandb

    # run.finish() returns before wandb-core has written the file out; teardown waits for it (a
    # process exit does the same, so only a reader in the training process needs this).
    wandb.teardown()
    run = {"run_id": None, "config": {}, "history": [], "summary": {}, "alerts": []}
    for payload in _payloads(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["run_id"] = record.run.run_id
            for item in record.run.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            run["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
        elif kind == "alert":
            run["alerts"].append({"title": record.alert.title, "text": record.alert.text,
                                  "level": record.alert.level, "wait_duration": record.alert.wait_duration})
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return run


def offline_runs(output_dir: Path) -> list[Path]:
    """The ``run-*.wandb`` files of every offline run under ``output_dir/wandb``."""
    return sorted(Path(output_dir).glob("wandb/offline-run-*/run-*.wandb"))


# wandb.init as imported, before any test patches it.
REAL_INIT = wandb.init


def record_modes(monkeypatch, fail_modes=(), block: threading.Event | None = None, returns=None):
    """Patch wandb.init: record each mode asked for; raise for ``fail_modes``; with ``block``, hang
    until it is set and then return ``returns``; otherwise start the real (offline) run."""
    modes = []

    def init(*args, **kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] in fail_modes:
            raise wandb.errors.CommError("api.wandb.ai: network is unreachable")
        if block is not None:
            block.wait(60)
            return returns
        return REAL_INIT(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    return modes
