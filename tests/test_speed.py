"""Speed levers (mmtrain.speed): train.compile, train.channels_last, cuDNN autotuning.

Their speed is measured in benchmarks/bench_levers.py, not here; these tests check that each lever
does what it says, leaves the numbers and the run's files as they were, and refuses bad input.
"""

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate.utils import DynamoBackend, is_compiled_module
from conftest import REPO, TINY, reset_accelerate, tiny_config
from safetensors import safe_open

from mmtrain.config import TrainConfig, load_config
from mmtrain.distributed import build_accelerator
from mmtrain.errors import ConfigError
from mmtrain.model import MultimodalModel, build_model
from mmtrain.speed import apply_channels_last, compile_mode, dynamo_plugin, enable_cudnn_benchmark, use_channels_last

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_inductor = pytest.mark.skipif(
    not torch.cuda.is_available() and shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile (inductor) on CPU needs a C++ compiler; none is installed (apt-get install g++)")
# A cold inductor compile takes 2-5 minutes on a 2-core CPU (the suite's budget is ~10 minutes in all),
# so the compiled runs are opt-in: MMTRAIN_TEST_COMPILE=1 python -m pytest tests/test_speed.py
opt_in_compile = pytest.mark.skipif(os.environ.get("MMTRAIN_TEST_COMPILE") != "1",
                                    reason="set MMTRAIN_TEST_COMPILE=1: a cold inductor compile takes minutes on CPU")


# ------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize(("value", "mode"), [(False, None), ("false", None), ("none", None), ("default", "default"),
                                             ("reduce-overhead", "reduce-overhead"), ("max-autotune", "max-autotune")])
def test_compile_values(value, mode):
    cfg = load_config(TINY, {"train.compile": value})
    assert compile_mode(cfg.train.compile) == mode
    plugin = dynamo_plugin(cfg.train.compile)
    if mode is None:
        assert plugin is None  # Accelerate's own default (its launcher variables) stays in charge
    else:
        assert plugin.backend == DynamoBackend.INDUCTOR and plugin.mode == mode


@pytest.mark.parametrize(("field", "value"), [("compile", "fast"), ("compile", "true"), ("channels_last", "nhwc")])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"train\.{field}"):
        load_config(TINY, {f"train.{field}": value})


def test_compile_without_a_cpp_compiler_says_so(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the C++ compiler check is for CPU runs")
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no g++ / c++ to be found
    with pytest.raises(ConfigError, match=r"train\.compile default needs a C\+\+ compiler.*--train\.compile none"):
        dynamo_plugin("default")


# ------------------------------------------------------------------------------------------- cuDNN

def test_cudnn_autotuning_is_left_off_on_cpu_and_set_on_cuda():
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        acc = build_accelerator(TrainConfig(cpu=True, compile="default"))
        assert acc.device.type == "cpu" and torch.backends.cudnn.benchmark is False
        assert acc.state.dynamo_plugin.backend == DynamoBackend.INDUCTOR  # train.compile reached Accelerate
        assert enable_cudnn_benchmark(CUDA) and torch.backends.cudnn.benchmark is True  # the flag alone
    finally:
        torch.backends.cudnn.benchmark = before


# ----------------------------------------------------------------------------------- channels_last

@pytest.mark.parametrize(("value", "device", "precision", "sharded", "on"), [
    ("auto", CPU, "no", False, False), ("auto", CPU, "bf16", False, False), ("auto", CUDA, "bf16", False, True),
    ("auto", CUDA, "fp16", False, True), ("auto", CUDA, "no", False, False), ("auto", CUDA, "bf16", True, False),
    ("true", CPU, "no", False, True), ("false", CUDA, "bf16", False, False)])
def test_channels_last_auto_rule(value, device, precision, sharded, on):
    assert use_channels_last(value, device, precision, sharded) is on


def _tiny_batch(cfg, vocab: int, n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    m = cfg.model
    ids = torch.randint(4, vocab, (n, m.max_caption_length), generator=g)
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    return {"pixel_values": torch.rand(n, m.image_channels, m.image_size, m.image_size, generator=g),
            "input_ids": ids, "attention_mask": mask}


def test_channels_last_gives_the_same_losses_and_gradients_in_fp32(tmp_path):
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    plain = build_model(cfg.model, 40)
    nhwc = copy.deepcopy(plain)
    assert apply_channels_last(nhwc, "true", CPU, "no")
    conv = next(p for p in nhwc.parameters() if p.dim() == 4 and p.shape[1] > 1)  # (O, I, kH, kW), I > 1
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    batch = _tiny_batch(cfg, 40)
    seen = []
    nhwc.image_encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    (lp, op), (ln, on) = plain(batch), nhwc(batch)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)  # converted on the way in
    assert batch["pixel_values"].is_contiguous()  # the caller's batch is left as it was
    for name in lp:
        torch.testing.assert_close(ln[name], lp[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(on["reconstruction"], op["reconstruction"], rtol=1e-5, atol=1e-6)
    lp["total_loss"].backward()
    ln["total_loss"].backward()
    for (name, p), q in zip(plain.named_parameters(), nhwc.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def _train(out, steps: int, **overrides) -> dict:
    from mmtrain.trainer import Trainer

    trainer = Trainer(tiny_config(out, **{"train.max_steps": steps, "wandb.mode": "disabled",
                                          "wandb.media_samples": 0, **overrides}))
    resumed_at = trainer.state.optimizer_step
    try:
        summary = trainer.fit()
    finally:
        trainer.accelerator.end_training()
        reset_accelerate()
    return {"trainer": trainer, "summary": summary, "resumed_at": resumed_at}


def _check_run_files(out, steps: int, trainer) -> None:
    """Checkpoint and export hold the plain model's keys (no ``_orig_mod.``), the export loads and
    its weights are the trained ones."""
    plain_keys = set(build_model(trainer.cfg.model, trainer.model_config.vocab_size).state_dict())
    checkpoint = out / "checkpoints" / f"step_{steps:08d}" / "model.safetensors"
    assert _keys(checkpoint) <= plain_keys and not any("_orig_mod" in k for k in _keys(checkpoint))
    exported = MultimodalModel.from_pretrained(str(out / "model"))
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False).state_dict()
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)


def test_channels_last_run_saves_resumes_and_exports(tmp_path):
    out = tmp_path / "run"
    first = _train(out, 1, **{"train.channels_last": "true"})
    assert first["trainer"].channels_last
    _check_run_files(out, 1, first["trainer"])
    second = _train(out, 2, **{"train.channels_last": "true", "train.resume": "auto"})
    assert second["resumed_at"] == 1 and second["summary"]["optimizer_steps"] == 2
    _check_run_files(out, 2, second["trainer"])


def test_channels_last_auto_is_off_for_a_cpu_run(tmp_path):
    from mmtrain.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, **{"wandb.mode": "disabled"}))
    assert trainer.cfg.train.channels_last == "auto" and trainer.channels_last is False
    assert all(p.is_contiguous() for p in trainer.model.parameters())


# ----------------------------------------------------------------------------------------- compile

@needs_inductor
@opt_in_compile
@pytest.mark.slow  # inductor on CPU: ~25 s per run with a warm compile cache, minutes when cold
def test_compiled_run_saves_resumes_and_exports(tmp_path):
    out = tmp_path / "run"
    first = _train(out, 3, **{"train.compile": "default"})
    assert is_compiled_module(first["trainer"].model)  # Accelerate compiled it in prepare()
    _check_run_files(out, 3, first["trainer"])
    second = _train(out, 5, **{"train.compile": "default", "train.resume": "auto"})
    assert second["resumed_at"] == 3 and second["summary"]["optimizer_steps"] == 5
    _check_run_files(out, 5, second["trainer"])
    assert all(torch.isfinite(torch.tensor(v)) for k, v in second["summary"].items()
               if k.startswith("final_") and isinstance(v, float))


@needs_inductor
@opt_in_compile
@pytest.mark.slow  # a compile on CPU (see above) and the laptop-sized synthetic set's first decode
def test_bench_levers_smoke():
    env = {**os.environ, "WANDB_MODE": "disabled"}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_levers.py"), "--preset", "tiny",
                          "--rounds", "1", "--steps", "2"], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| tiny |")]
    assert [row.split("|")[2].strip() for row in rows] == ["channels_last", "compile"]
    compile_row = rows[1].split("|")
    assert float(compile_row[7]) > 0 and compile_row[8].strip()  # compile seconds, break-even steps


# A step-like pattern, three times: 30 tensors of 4-12 MB (~240 MB) allocated, written and freed. Prints
# whether the setting was applied, then per round glibc's own accounting (mallinfo2): bytes in mmapped
# blocks while the tensors live, bytes kept free in the heap after they are freed, and the round's
# minor page faults.
ALLOCATION_ROUNDS = """
import ctypes, resource, sys, torch
from mmtrain.speed import reuse_host_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
print(reuse_host_memory(sys.argv[1] == "on"))
for _ in range(3):
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.empty((1 + i % 3) << 20).fill_(1.0) for i in range(30)]
    mapped = libc.mallinfo2().hblkhd
    del xs
    print(mapped, libc.mallinfo2().fordblks, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _glibc_with_mallinfo2() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")  # glibc >= 2.33
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc_with_mallinfo2(),
                    reason="glibc's mallopt and mallinfo2 (Linux, glibc >= 2.33)")
def test_reuse_host_memory_keeps_freed_blocks_in_the_heap_for_the_next_step():
    """In a fresh process each (the setting is process-wide). glibc's own accounting, which does not
    depend on the heap's layout (whether glibc's defaults give memory back varies from process to
    process; the page faults they cost vary with it, 16,000-61,000 per round here): with the setting
    on, 4-12 MB blocks come from the heap and stay there, free, once released, so the next rounds
    fault in almost nothing; with glibc's defaults the first round's blocks are fresh mmaps."""
    def rounds(mode: str) -> tuple[str, list[list[int]]]:
        done = subprocess.run([sys.executable, "-c", ALLOCATION_ROUNDS, mode], cwd=REPO, capture_output=True,
                              text=True, check=True)
        applied, *lines = done.stdout.split("\n")
        return applied, [[int(x) for x in line.split()] for line in lines if line.strip()]

    (off_applied, off), (on_applied, on) = rounds("off"), rounds("on")
    assert (off_applied, on_applied) == ("False", "True")
    mb = 1 << 20
    assert off[0][0] > 200 * mb  # glibc's defaults: the first ~240 MB of blocks are mmapped
    for mapped, kept_free, _ in on:
        assert mapped < 20 * mb and kept_free > 200 * mb  # from the heap, and kept there once freed
    assert all(faults < 61_440 // 10 for _, _, faults in on[1:])  # < 10% of the rounds' 61,440 pages
