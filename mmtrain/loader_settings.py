"""How a rank's loaders load: ``data.num_workers`` and ``data.decode_cache`` resolved for this machine.

``auto`` worker counts come from the device, the cores this process may use and the node's process count
(:func:`auto_num_workers`, a pure function); the decode cache's size rule is
:func:`mmtrain.decoded.wants_decode_cache`. :class:`LoaderSettings` is what a run used: printed once at
start-up and recorded in its run config.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmtrain.config import DataConfig, ModelConfig
from mmtrain.decoded import DECODE_CACHE_AUTO_BYTES, decoded_bytes, wants_decode_cache

# data.num_workers auto: on CUDA at most this many workers per rank (decoding 8 batches in parallel keeps
# any one GPU of ours fed; more workers only cost memory and start-up) ...
MAX_AUTO_WORKERS = 8
# ... and on CPU one worker per this many cores of the rank: the step's intra-op threads use every core, so
# a worker takes cores from the step. On 2 cores 0 workers is fastest (benchmarks/BENCHMARKS.md, Data
# pipeline); decoding is ~10% of a laptop CPU step, so a worker pays once it costs the step at most ~1/8.
CPU_CORES_PER_WORKER = 8


def auto_num_workers(device_type: str, cores: int, processes: int) -> int:
    """data.num_workers auto for a rank: ``device_type`` its torch device type ("cuda", "cpu", ...), ``cores``
    the CPU cores this process may use, ``processes`` the training processes sharing them (the node's
    ranks). A pure function of the three: CUDA min(8, cores per process - 1) (one core stays with the
    training process); anything else cores per process // 8 (0 below 8 cores per process)."""
    per_process = max(1, cores // max(1, processes))
    if device_type == "cuda":
        return max(0, min(MAX_AUTO_WORKERS, per_process - 1))
    return per_process // CPU_CORES_PER_WORKER


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask (taskset, cgroups cpusets, SLURM's binding),
    capped by a cgroup v2 CPU quota (``cpu.max``: Docker ``--cpus``, Kubernetes limits), which the mask
    does not show."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def local_processes(world_size: int) -> int:
    """Training processes on this machine: LOCAL_WORLD_SIZE (torchrun and accelerate launch set it), else
    ``world_size`` (one machine)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "")))
    except ValueError:
        return max(1, world_size)


@dataclass(frozen=True)
class LoaderSettings:
    """How this rank's loaders load: the resolved data.num_workers and data.decode_cache."""

    num_workers: int
    pin_memory: bool
    decode_cache: bool
    why: str  # the inputs of the auto choices, for the start-up line

    def as_config(self) -> dict[str, Any]:
        """Flat values for the run config (what the run used, next to the requested data.* values)."""
        return {"data_num_workers": self.num_workers, "data_pin_memory": self.pin_memory,
                "data_decode_cache": self.decode_cache}

    def line(self) -> str:
        workers = f"{self.num_workers} worker(s) per process" if self.num_workers else "no workers (in-process)"
        cache = "images decoded once (decode cache)" if self.decode_cache else "images decoded every epoch"
        return f"mmtrain: data loading: {workers}{', pinned memory' if self.pin_memory else ''}; {cache} ({self.why})"


def loader_settings(data: DataConfig, model: ModelConfig, device_type: str, world_size: int,
                    rows: int) -> LoaderSettings:
    """Resolve data.num_workers and data.decode_cache for a rank on ``device_type`` in a run of
    ``world_size`` processes, ``rows`` images to cache (train + validation)."""
    cores, processes = usable_cores(), local_processes(world_size)
    if data.num_workers == "auto":
        workers = auto_num_workers(device_type, cores, processes)
        why = [f"num_workers auto: {device_type}, {cores} core(s), {processes} process(es) on this machine"]
    else:
        workers, why = int(data.num_workers), []
    cache = wants_decode_cache(data.decode_cache, rows, model)
    if data.decode_cache == "auto":
        why.append(f"decode_cache auto: {decoded_bytes(rows, model) / 2**20:.0f} MiB decoded, "
                   f"{'<=' if cache else '>'} {DECODE_CACHE_AUTO_BYTES / 2**30:.0f} GiB")
    return LoaderSettings(workers, device_type == "cuda", cache, "; ".join(why) or "as configured")
