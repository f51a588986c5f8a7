"""Per-rank hardware readings: the rank's own GPU (torch + NVML) and its process/host (psutil).

Each rank reads its own device into a fixed-length vector so the trainer can gather all ranks in
one collective. Unavailable readings (no GPU, no NVML) are NaN and are dropped before logging,
so CPU-only runs log no GPU keys and never fail because of monitoring.
"""

import math
import sys
import warnings

import psutil
import torch

# The readings, by name (gathered by name; see mmtrain.distributed.gather_named).
HW_KEYS = (
    "gpu_memory_used",      # MB, NVML "used" on this rank's device (all processes on it)
    "gpu_memory_percent",   # 0-100, NVML used / total
    "gpu_utilization",      # %, NVML utilisation over the driver's last sample period
    "torch_allocated_mb",   # MB held by this process's tensors now
    "torch_reserved_mb",    # MB held by this process's caching allocator now
    "torch_peak_mb",        # MB, max allocated since the previous reading
    "cpu_percent",          # % of one core used by this process since the previous reading
    "system_cpu_percent",   # % of all cores used on the host since the previous reading
    "rss_mb",               # MB, resident memory of this process
    "peak_rss_mb",          # MB, peak resident memory of this process since it started
    "ram_percent",          # 0-100, host memory in use
)

_MB = 1024.0**2


def _peak_rss_mb() -> float:
    try:
        import resource

        # ru_maxrss is KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024.0 if sys.platform != "darwin" else peak / _MB
    except (ImportError, OSError):
        return math.nan


def _nvml_handle(device: torch.device):  # -> pynvml handle | None
    """NVML handle of the GPU that ``device`` is on.

    NVML enumerates all GPUs and ignores CUDA_VISIBLE_DEVICES, so ``cuda:0`` in a process that
    sees only GPU 3 is NVML index 3. The UUID is the same in both worlds, so map through it.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    except Exception as e:  # no NVML library or driver: keep training, lose only these readings
        warnings.warn(f"NVML unavailable ({e}); GPU memory/utilisation will not be logged", stacklevel=2)
        return None


class HardwareMonitor:
    """Reads :data:`HW_KEYS` for the calling rank. Cheap: call it once per log step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.process = psutil.Process()
        # psutil's first cpu_percent(None) call returns 0.0: prime both counters now so the first
        # logged value covers the time since start-up instead.
        self.process.cpu_percent(interval=None)
        psutil.cpu_percent(interval=None)
        self.nvml = _nvml_handle(device) if self.cuda else None

    def read(self) -> dict[str, float]:
        """This rank's readings by :data:`HW_KEYS` name; NaN where the rank has no such reading."""
        nan = math.nan
        gpu_used = gpu_pct = gpu_util = alloc = reserved = peak = nan
        if self.nvml is not None:
            import pynvml

            mem = pynvml.nvmlDeviceGetMemoryInfo(self.nvml)
            gpu_used, gpu_pct = mem.used / _MB, 100.0 * mem.used / mem.total
            gpu_util = float(pynvml.nvmlDeviceGetUtilizationRates(self.nvml).gpu)
        if self.cuda:
            alloc = torch.cuda.memory_allocated(self.device) / _MB
            reserved = torch.cuda.memory_reserved(self.device) / _MB
            peak = torch.cuda.max_memory_allocated(self.device) / _MB
            torch.cuda.reset_peak_memory_stats(self.device)
        rss = self.process.memory_info().rss / _MB
        return {"gpu_memory_used": gpu_used, "gpu_memory_percent": gpu_pct, "gpu_utilization": gpu_util,
                "torch_allocated_mb": alloc, "torch_reserved_mb": reserved, "torch_peak_mb": peak,
                "cpu_percent": self.process.cpu_percent(interval=None),
                "system_cpu_percent": psutil.cpu_percent(interval=None),
                "rss_mb": rss, "peak_rss_mb": max(rss, _peak_rss_mb()), "ram_percent": psutil.virtual_memory().percent}
