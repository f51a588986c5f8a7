"""No host-device synchronisation in a non-log training step.

On CPU there is no device to wait for, so the test counts the operations that *would* block on a
GPU: ``.item()``, ``.tolist()``, ``.numpy()``, and tensor -> bool/float/int conversions. They are
allowed inside a log step (and the epoch-end evaluation); anywhere else in the training loop they
fail the test. The check can fail: a deliberate ``.item()`` in the step is caught below.
"""

import traceback

import pytest
import torch
from conftest import tiny_config

from mmtrain.trainer import Trainer

SYNCING = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")
# Callers whose tensors live on the host by construction, on a GPU too: the sampler's permutation
# and collate (torch.utils.data), and the optimizers' step counters (CPU tensors unless
# capturable). Their conversions never wait for a device.
HOST_SIDE = ("torch/utils/data/", "torch/optim/")


class SyncCounter:
    def __init__(self, monkeypatch):
        self.in_loop = False
        self.allowed = 0
        self.violations = []
        for name in SYNCING:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            if counter.in_loop and not counter.allowed:
                stack = traceback.extract_stack(limit=8)[:-1]
                if not any(part in stack[-1].filename for part in HOST_SIDE):
                    counter.violations.append((name, "".join(traceback.format_list(stack))))
            return original(tensor, *args, **kwargs)

        return wrapper

    def region(self, fn, flag):
        counter = self

        def wrapped(*args, **kwargs):
            if flag == "loop":
                counter.in_loop = True
            else:
                counter.allowed += 1
            try:
                return fn(*args, **kwargs)
            finally:
                if flag == "loop":
                    counter.in_loop = False
                else:
                    counter.allowed -= 1

        return wrapped


def _run(tmp_path, monkeypatch, extra_step=None, sample_metrics="log_steps"):
    trainer = Trainer(tiny_config(tmp_path, **{"train.max_steps": 9, "wandb.log_frequency": 4,
                                               "wandb.image_log_frequency": 4, "wandb.mode": "offline",
                                               "wandb.sample_metrics": sample_metrics}))
    counter = SyncCounter(monkeypatch)
    # The public points that read the host by design: the guard's read-out (log steps, before a
    # save), the log record, the epoch's validation, a checkpoint, the media of a media step.
    for owner, name in ((trainer, "read_nonfinite_or_raise"), (trainer, "validate_and_log_epoch"),
                        (trainer, "save_checkpoint"), (trainer.telemetry, "gather_log_record"),
                        (trainer.media, "reconstructions")):
        monkeypatch.setattr(owner, name, counter.region(getattr(owner, name), "allowed"))
    monkeypatch.setattr(trainer, "train_epoch", counter.region(trainer.train_epoch, "loop"))
    if extra_step is not None:
        original = trainer.telemetry.on_micro_batch

        def on_micro_batch(batch, losses, outputs, *args, **kwargs):
            extra_step(losses)
            return original(batch, losses, outputs, *args, **kwargs)

        monkeypatch.setattr(trainer.telemetry, "on_micro_batch", on_micro_batch)
    trainer.fit()
    return counter


@pytest.mark.parametrize("sample_metrics", ["log_steps", "every_step"])
def test_non_log_steps_do_not_sync(tmp_path, monkeypatch, sample_metrics):
    counter = _run(tmp_path, monkeypatch, sample_metrics=sample_metrics)
    assert not counter.violations, "\n\n".join(f"{n} at\n{where}" for n, where in counter.violations[:3])


def test_the_counter_catches_a_sync(tmp_path, monkeypatch):
    counter = _run(tmp_path, monkeypatch, extra_step=lambda losses: losses["total_loss"].item())
    assert [name for name, _ in counter.violations][:1] == ["item"]
    assert len(counter.violations) >= 9 - 3  # every micro-batch outside the log steps


def test_step_code_has_no_item_calls():
    """A cheap static guard next to the dynamic one: no .item()/.tolist() in the per-step code."""
    import inspect

    from mmtrain.resilience import NonFiniteGuard
    from mmtrain.telemetry import Telemetry
    from mmtrain.windows import Window, micro_batch_rows, step_row

    for fn in (Trainer.train_epoch, Trainer.skip_step_if_nonfinite, Telemetry.on_micro_batch,
               Telemetry.on_optimizer_step, Telemetry.timed, Window.add_rows, Window.add_step_row,
               micro_batch_rows, step_row, NonFiniteGuard.add_loss, NonFiniteGuard.check_step):
        source = inspect.getsource(fn)
        assert ".item()" not in source and ".tolist()" not in source, fn.__qualname__
