"""Scaling: weak-scaling throughput of real ``mmtrain train`` runs on 1, 2 and 4 processes, and the
communication estimate for the reference model that benchmarks/SCALING.md is written from.

    python benchmarks/bench_scaling.py                          # CPU, gloo: laptop model, 1 2 4 processes (~2 min)
    python benchmarks/bench_scaling.py --presets tiny laptop --rounds 2
    python benchmarks/bench_scaling.py --gpu                    # NCCL: default.yaml on 1 2 4 8 GPUs (those present)
    python benchmarks/bench_scaling.py --estimate               # reference model: bytes, FLOPs, estimated efficiency

**Measured.** Each cell is one ``accelerate launch`` of ``mmtrain train`` (one gloo or NCCL process
group) for a fixed number of optimizer steps with a fixed per-process batch (weak scaling: the global
batch grows with the process count), W&B disabled, no progress bar. Throughput is read from the run's
own ``metrics.jsonl``: the training records' ``samples_per_second`` (global samples over the main
rank's wall time of the log window), first window dropped as warm-up, the rest combined as total
samples / total time. ``efficiency = throughput_N / (N x throughput_1)``. On CPU each process gets
``--threads`` torch threads (default 1), so on a 2-core machine 1 -> 2 processes adds a core and
4 processes are oversubscribed: two processes share each core, and efficiency can be at most ~50% of
the 2-process figure. The run is stopped before an epoch ends, so no window holds a validation pass.
On CPU the table also gives the estimate of SCALING.md for this host: the 1-process step time (stretched
by N x threads / cores when oversubscribed) plus a separately timed gloo all-reduce of the model's fp32
gradients in DDP's bucket sizes, no overlap.

**Estimated** (``--estimate``). Builds the reference model (configs/default.yaml), counts its
parameters and DDP gradient buckets, measures one forward+backward's FLOPs with
``torch.utils.flop_counter.FlopCounterMode`` and prints the step-time model of SCALING.md:
step = compute + gradient all-reduce (bandwidth + per-bucket latency), with no overlap and with full
overlap of the all-reduce under the backward pass. Every constant is a flag; their sources are in
SCALING.md.
"""

import argparse
import itertools
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The full synthetic set at every preset: its images are cached after the first run, and 4627 samples
# leave room for --steps optimizer steps of 4 processes x 16 before an epoch (and its validation) ends.
TRAIN_SIZE, VAL_SIZE = 4627, 514


# --------------------------------------------------------------------------------------------------
# Measured: real runs
# --------------------------------------------------------------------------------------------------

def free_port() -> int:
    """A port nobody listens on now: concurrent runs (other benchmarks, the test suite's 29500) must
    not meet in one rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int, gpu: bool) -> list[str]:
    """``accelerate launch`` for ``processes`` workers on this host. Accelerate refuses ``--multi_gpu``
    with one process, so one process is a plain launch (still through the same launcher)."""
    cmd = [shutil.which("accelerate") or "accelerate", "launch", "--num_machines", "1", "--num_processes",
           str(processes), "--mixed_precision", "bf16" if gpu else "no", "--dynamo_backend", "no"]
    if processes > 1:
        cmd += ["--multi_gpu", "--main_process_port", str(free_port())]
    return cmd


def train_args(preset: str, out: Path, batch_size: int, steps: int, log_frequency: int) -> list[str]:
    return ["-m", "mmtrain", "train", "--config", str(REPO / "configs" / f"{preset}.yaml"),
            "--train.output_dir", str(out), "--train.overwrite", "true",
            "--train.batch_size", str(batch_size), "--train.gradient_accumulation_steps", "1",
            "--train.max_steps", str(steps), "--train.progress_bar", "false",
            "--data.synthetic_train_size", str(TRAIN_SIZE), "--data.synthetic_val_size", str(VAL_SIZE),
            "--wandb.mode", "disabled", "--wandb.log_frequency", str(log_frequency), "--wandb.media_samples", "0"]


def throughput(metrics: Path) -> dict[str, float]:
    """samples/s, mean slowest-rank step time (s) and data-wait share over the training records of
    ``metrics.jsonl``, the first log window left out as warm-up (start-up, allocator, first batches).

    Records are combined as total samples / total seconds, each window's seconds being its samples
    over its ``samples_per_second``. Raises ``ValueError`` with fewer than two training records.
    """
    records = [r for r in map(json.loads, metrics.read_text().splitlines())
               if "samples_per_second" in r and "optimizer_step" in r]
    if len(records) < 2:
        raise ValueError(f"{metrics}: {len(records)} training record(s); raise --steps or lower --log-frequency")
    samples = seconds = 0.0
    for before, record in itertools.pairwise(records):
        window = record["samples_seen"] - before["samples_seen"]
        samples += window
        seconds += window / record["samples_per_second"]
    kept = records[1:]
    return {"samples_per_second": samples / seconds,
            "step_time": statistics.fmean(r["hw/max/step_time"] for r in kept),
            "data_wait": statistics.fmean(r["hw/max/data_wait_fraction"] for r in kept)}


def run_once(preset: str, processes: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = launch_command(processes, args.gpu) + train_args(preset, out, args.batch_size, args.steps,
                                                            args.log_frequency)
    if not args.gpu:
        env["OMP_NUM_THREADS"] = str(args.threads)
        env["CUDA_VISIBLE_DEVICES"] = ""  # a GPU host measured on CPU: gloo, as on a laptop
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"bench_scaling: {preset} x {processes} failed (exit {proc.returncode}):\n"
                         f"{' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    result = throughput(out / "metrics.jsonl")
    result["parameters"] = json.loads((out / "summary.json").read_text())["total_parameters"]
    result["wall"] = time.perf_counter() - started
    print(f"  {preset:<8} {processes} process(es): {result['samples_per_second']:8.1f} samples/s  "
          f"(run {result['wall']:.0f}s)", flush=True)
    return result


def _allreduce_worker(rank: int, world: int, port: int, grad_bytes: int, reps: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # DDP's bucket caps applied to the total (which tensor goes where does not change the bytes on the wire)
    first = min(grad_bytes, DDP_FIRST_BUCKET_BYTES)
    sizes = [first] + [min(DDP_BUCKET_BYTES, grad_bytes - at) for at in range(first, grad_bytes, DDP_BUCKET_BYTES)]
    buckets = [torch.ones(max(size // 4, 1)) for size in sizes]
    times = []
    for i in range(reps + 2):  # two warm-up rounds: connection set-up, first allocation
        dist.barrier()
        start = time.perf_counter()
        for bucket in buckets:
            dist.all_reduce(bucket)
        if i >= 2:
            times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(str(statistics.median(times)))
    dist.destroy_process_group()


def gloo_allreduce_seconds(grad_bytes: int, processes: int, threads: int, reps: int = 10) -> float:
    """Median wall time of one step's gradient all-reduce (DDP's bucket sizes) between ``processes``
    gloo processes on this host, nothing else running in them: the communication term of the
    CPU estimate."""
    import torch.multiprocessing as mp

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "seconds")
        mp.spawn(_allreduce_worker, args=(processes, free_port(), grad_bytes, reps, out), nprocs=processes)
        return float(Path(out).read_text())


def measure(args: argparse.Namespace) -> dict[tuple[str, int], list[dict[str, float]]]:
    """Every (preset, process count) ``args.rounds`` times, the process order reversed every other
    round, so a drift of the machine's speed does not always favour the same count."""
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mmtrain-scaling-") as tmp:
        for r in range(args.rounds):
            for preset in args.presets:
                for n in args.processes if r % 2 == 0 else reversed(args.processes):
                    out = Path(tmp) / f"{preset}-{n}-{r}"
                    results.setdefault((preset, n), []).append(run_once(preset, n, args, out))
    return results


def estimates(results: dict[tuple[str, int], list[dict[str, float]]], args: argparse.Namespace,
              cores: int) -> dict[tuple[str, int], tuple[float, float]]:
    """(all-reduce seconds, estimated efficiency) per multi-process cell, the model of SCALING.md applied
    to this host: compute = the 1-process step time, stretched by N x threads / cores once the processes
    outnumber the cores, plus the measured gloo all-reduce of the model's fp32 gradients, no overlap."""
    out = {}
    for preset, n in results:
        if n == 1 or (preset, 1) not in results:
            continue
        one = results[(preset, 1)]
        compute = statistics.median(r["step_time"] for r in one) * max(1.0, n * args.threads / cores)
        comm = gloo_allreduce_seconds(4 * int(one[0]["parameters"]), n, args.threads)
        out[(preset, n)] = (comm, statistics.median(r["step_time"] for r in one) / (compute + comm))
    return out


def table(results: dict[tuple[str, int], list[dict[str, float]]], batch_size: int,
          estimated: dict[tuple[str, int], tuple[float, float]]) -> list[str]:
    """The markdown table: medians over rounds; efficiency against the same preset's 1-process run."""
    lines = ["| preset | processes | global batch | samples/s | per process | efficiency | estimate | all-reduce ms "
             "| step ms (slowest rank) | data wait (slowest rank) |", "|---|" + "---:|" * 9]
    for (preset, n), runs in results.items():
        sps = statistics.median(r["samples_per_second"] for r in runs)
        base = results.get((preset, 1))
        eff = f"{sps / (n * statistics.median(r['samples_per_second'] for r in base)):.0%}" if base else "n/a"
        comm, est = estimated.get((preset, n), (0.0, 1.0 if n == 1 else math.nan))
        est_text = "n/a" if math.isnan(est) else f"{est:.0%}"
        step = 1000 * statistics.median(r["step_time"] for r in runs)
        wait = statistics.median(r["data_wait"] for r in runs)
        lines.append(f"| {preset} | {n} | {n * batch_size} | {sps:.1f} | {sps / n:.1f} | {eff} | {est_text} "
                     f"| {1000 * comm:.1f} | {step:.1f} | {wait:.0%} |")
    return lines


def check_steps(args: argparse.Namespace) -> None:
    """Refuse a run whose last window would hold an epoch end (a validation pass in the timing)."""
    most = TRAIN_SIZE // (max(args.processes) * args.batch_size)
    if args.steps > most:
        raise SystemExit(f"bench_scaling: --steps {args.steps} runs past one epoch of {TRAIN_SIZE} samples at "
                         f"{max(args.processes)} x {args.batch_size}; use --steps {most} or less")
    if args.steps < 2 * args.log_frequency:
        raise SystemExit(f"bench_scaling: --steps must be at least 2 x --log-frequency ({2 * args.log_frequency}): "
                         "the first log window is warm-up")


# --------------------------------------------------------------------------------------------------
# Estimated: the reference model on paper
# --------------------------------------------------------------------------------------------------

DDP_FIRST_BUCKET_BYTES = 1024 * 1024  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DDP_BUCKET_BYTES = 25 * 1024 * 1024  # DistributedDataParallel(bucket_cap_mb=25), the default


def ddp_buckets(sizes_bytes: list[int]) -> list[int]:
    """Bucket sizes (bytes) DDP forms from gradients of ``sizes_bytes`` in registration order: filled
    in reverse order (the order the backward produces them), the first bucket capped at 1 MiB, the
    others at 25 MiB; a tensor larger than the cap is a bucket of its own. DDP rebuilds its buckets
    after the first step in actual gradient-ready order, which for this sequential model is close."""
    buckets, current, cap = [], 0, DDP_FIRST_BUCKET_BYTES
    for size in reversed(sizes_bytes):
        current += size
        if current >= cap:
            buckets.append(current)
            current, cap = 0, DDP_BUCKET_BYTES
    return [*buckets, current] if current else buckets


class OpCounter(TorchDispatchMode):
    """Counts the aten operators a region dispatches: in eager mode each one costs host time (Python,
    dispatcher, a kernel launch for those that compute), whatever the size of its tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        self.views += func.is_view or func.__name__.startswith(("detach", "_unsafe_view"))
        return func(*args, **(kwargs or {}))


def reference_model(vocab_size: int, batch_size: int) -> dict[str, float]:
    """Parameters, gradient bytes, DDP buckets and one training step's FLOPs of configs/default.yaml."""
    from mmtrain.config import load_config
    from mmtrain.model import build_model

    cfg = load_config(REPO / "configs" / "default.yaml", {})
    model = build_model(cfg.model, vocab_size).train()
    params = [p for p in model.parameters() if p.requires_grad]
    side, length = cfg.model.image_size, cfg.model.max_caption_length
    torch.manual_seed(0)
    batch = {"pixel_values": torch.rand(batch_size, cfg.model.image_channels, side, side),
             "input_ids": torch.randint(4, vocab_size, (batch_size, length)),
             "attention_mask": torch.ones(batch_size, length, dtype=torch.long)}
    ops = OpCounter()
    with FlopCounterMode(display=False) as counter, ops:
        losses, _ = model(batch)
        forward = counter.get_total_flops()
        losses["total_loss"].backward()
        total = counter.get_total_flops()
    buckets = ddp_buckets([4 * p.numel() for p in params])
    return {"parameters": sum(p.numel() for p in params), "grad_bytes": 4 * sum(p.numel() for p in params),
            "buckets": len(buckets), "largest_bucket": max(buckets), "forward_flops": forward,
            "step_flops": total, "batch_size": batch_size, "ops": ops.calls, "compute_ops": ops.calls - ops.views}


def allreduce_seconds(grad_bytes: float, ranks: int, busbw: float, buckets: int, alpha: float) -> float:
    """Ring all-reduce time of all buckets: bandwidth term 2(n-1)/n x bytes / busbw (the nccl-tests
    bus-bandwidth definition) plus 2(n-1) latency hops of ``alpha`` seconds per bucket."""
    return 2 * (ranks - 1) / ranks * grad_bytes / busbw + buckets * 2 * (ranks - 1) * alpha


def hierarchical_seconds(grad_bytes: float, nodes: int, gpus: int, nvlink_busbw: float, nic_bw: float,
                         nics_per_node: int, buckets: int, alpha_nvlink: float, alpha_ib: float) -> float:
    """Multi-node all-reduce as NCCL's hierarchy does it, not pipelined (an upper bound): reduce-scatter and
    all-gather inside the node over NVLink, and between them an all-reduce of each GPU's 1/gpus shard across
    ``nodes`` ranks, the node's traffic spread over ``nics_per_node`` NICs of ``nic_bw`` bytes/s each."""
    intra = allreduce_seconds(grad_bytes, gpus, nvlink_busbw, buckets, alpha_nvlink) if gpus > 1 else 0.0
    inter = 2 * (nodes - 1) / nodes * grad_bytes / (nics_per_node * nic_bw) + buckets * 2 * (nodes - 1) * alpha_ib
    return intra + inter


def efficiency(forward: float, backward: float, comm: float) -> tuple[float, float]:
    """(no overlap, full overlap): compute / step time, with the all-reduce after the backward pass, or
    entirely under it (DDP starts each bucket's all-reduce as its gradients are ready; it cannot start
    before the backward does, so the forward never hides it)."""
    compute = forward + backward
    return compute / (compute + comm), compute / (forward + max(backward, comm))


def estimate(args: argparse.Namespace) -> None:
    ref = reference_model(args.vocab, args.est_batch)
    flops_per_sample = ref["step_flops"] / ref["batch_size"]
    sustained = args.mfu * args.peak_tflops * 1e12
    fwd_share = ref["forward_flops"] / ref["step_flops"]
    gb = ref["grad_bytes"]
    print(f"reference model (configs/default.yaml, vocab {args.vocab}): {ref['parameters']:,} parameters, "
          f"fp32 gradients {gb / 1e6:.1f} MB ({gb / 2 / 1e6:.1f} MB with a bf16 comm hook), "
          f"{ref['buckets']} DDP buckets (largest {ref['largest_bucket'] / 1e6:.1f} MB)")
    print(f"one step at batch {ref['batch_size']}: forward {ref['forward_flops'] / 1e9:.1f} GFLOP, forward+backward "
          f"{ref['step_flops'] / 1e9:.1f} GFLOP = {flops_per_sample / 1e9:.2f} GFLOP/sample; at {args.mfu:.0%} of "
          f"{args.peak_tflops:.0f} TFLOP/s: {1e3 * flops_per_sample / sustained:.4f} ms/sample")
    print(f"aten operators per forward+backward: {ref['ops']:,} ({ref['compute_ops']:,} not views/detach)")
    print("\nper-rank bytes sent per optimizer step, ring all-reduce 2(N-1)/N x gradient bytes:")
    print("| N | fp32 MB | bf16 hook MB |\n|---:|---:|---:|")
    for n in (2, 4, 8, 16, 64):
        print(f"| {n} | {2 * (n - 1) / n * gb / 1e6:.1f} | {(n - 1) / n * gb / 1e6:.1f} |")

    # compute scenarios: (label, seconds per step on one GPU)
    scenarios = [(f"B={b}, {args.mfu:.0%} of peak", b * flops_per_sample / sustained) for b in args.batches]
    scenarios.append((f"B={args.batches[0]}, overhead-bound", args.overhead_ms / 1e3))
    head = " | ".join(f"{label} ({1e3 * t:.2f} ms)" for label, t in scenarios)
    print(f"\none node, NVLink (busbw in GB/s), alpha {args.alpha_nvlink_us:g} us/hop; efficiency no overlap / "
          f"full overlap:\n| N | busbw | comm ms | {head} |\n|---:|---:|---:|" + "---:|" * len(scenarios))
    for busbw in args.nvlink_busbw:
        for n in (2, 4, 8):
            comm = allreduce_seconds(gb, n, busbw * 1e9, ref["buckets"], args.alpha_nvlink_us * 1e-6)
            cells = " | ".join("{:.0%} / {:.0%}".format(*efficiency(t * fwd_share, t * (1 - fwd_share), comm))
                               for _, t in scenarios)
            print(f"| {n} | {busbw:g} | {1e3 * comm:.2f} | {cells} |")

    print(f"\nN nodes x {args.gpus_per_node} GPUs, InfiniBand; NVLink busbw {args.nvlink_busbw[0]:g} GB/s inside the "
          f"node, alpha {args.alpha_ib_us:g} us/IB hop; efficiency against 1 GPU, no overlap / full overlap:")
    print(f"| IB Gb/s | NICs/node | nodes | comm ms | {head} |\n|---:|---:|---:|---:|" + "---:|" * len(scenarios))
    for gbits in args.ib_gbits:
        for nics in (args.gpus_per_node, 1):
            for nodes in (2, 4, 16):
                comm = hierarchical_seconds(gb, nodes, args.gpus_per_node, args.nvlink_busbw[0] * 1e9,
                                            gbits / 8 * 1e9, nics, ref["buckets"], args.alpha_nvlink_us * 1e-6,
                                            args.alpha_ib_us * 1e-6)
                cells = " | ".join("{:.0%} / {:.0%}".format(*efficiency(t * fwd_share, t * (1 - fwd_share), comm))
                                   for _, t in scenarios)
                print(f"| {gbits:g} | {nics} | {nodes} | {1e3 * comm:.2f} | {cells} |")


# --------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="NCCL on this host's GPUs (default preset: default)")
    parser.add_argument("--presets", nargs="+", help="configs/<preset>.yaml (default: laptop on CPU, default on GPU)")
    parser.add_argument("--processes", nargs="+", type=int,
                        help="process counts (default: 1 2 4 on CPU; 1 2 4 8 up to the GPU count)")
    parser.add_argument("--batch-size", type=int, default=16, help="per-process batch (weak scaling)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--log-frequency", type=int, default=5, help="optimizer steps per log window")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process on CPU")
    parser.add_argument("--rounds", type=int, default=1, help="runs per cell (the table shows medians)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per run")
    est = parser.add_argument_group("--estimate (constants' sources: benchmarks/SCALING.md)")
    est.add_argument("--estimate", action="store_true", help="print the on-paper estimate instead of measuring")
    est.add_argument("--vocab", type=int, default=1266, help="vocabulary size (the guide's dataset: 1266)")
    est.add_argument("--est-batch", type=int, default=16, help="batch the FLOPs are counted on")
    est.add_argument("--batches", nargs="+", type=int, default=[16, 128], help="per-GPU batches to tabulate")
    est.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16 peak")
    est.add_argument("--mfu", type=float, default=0.4, help="sustained fraction of the peak")
    est.add_argument("--overhead-ms", type=float, default=10.0, help="an overhead-bound step time to compare")
    est.add_argument("--nvlink-busbw", nargs="+", type=float, default=[360.0, 480.0], help="GB/s")
    est.add_argument("--ib-gbits", nargs="+", type=float, default=[100.0, 200.0, 400.0], help="Gb/s per NIC")
    est.add_argument("--gpus-per-node", type=int, default=8)
    est.add_argument("--alpha-nvlink-us", type=float, default=5.0, help="latency per ring hop inside a node")
    est.add_argument("--alpha-ib-us", type=float, default=5.0, help="latency per ring hop between nodes")
    args = parser.parse_args()

    if args.estimate:
        estimate(args)
        return 0
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("bench_scaling: --gpu needs CUDA; without it, leave --gpu out to measure gloo on CPU")
    args.presets = args.presets or (["default"] if args.gpu else ["laptop"])
    if args.processes is None:
        args.processes = [n for n in (1, 2, 4, 8) if n <= torch.cuda.device_count()] if args.gpu else [1, 2, 4]
    check_steps(args)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name(0) if args.gpu else f"CPU, {cores} cores, {args.threads} thread(s)/process"
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {device}; load average {load} before; {args.steps} steps x "
          f"{args.batch_size}/process, first of {args.steps // args.log_frequency} log windows dropped", flush=True)
    results = measure(args)
    estimated = {} if args.gpu else estimates(results, args, cores)
    print(f"load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())} after\n")
    print("\n".join(table(results, args.batch_size, estimated)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
