"""Checkpoints: the whole save policy, and saving and restoring every registered component.

:class:`CheckpointManager` owns ``output_dir/checkpoints``: when a checkpoint is due
(:meth:`~CheckpointManager.should_save`: every N optimizer steps, every M minutes, at an epoch
end, on a stop signal; never twice for one step), writing it, keeping the last k, finding the one
to resume, and restoring it. Components register their state once, by name, when the manager is
built (torchtitan's ``states={...}``): anything with ``state_dict()`` / ``load_state_dict()``.
Shared states (the same on every rank) go to ``train_state.json``; per-rank states (RNG, the
telemetry windows) to each rank's own file. A new piece of state needs no edit here.

A checkpoint is ``checkpoints/step_XXXXXXXX/``::

    model.safetensors   the weights
    optimizer.pt        AdamW state (identical on every rank after DDP's all-reduce)
    scheduler.pt        the LR schedule's position
    scaler.pt           fp16 GradScaler state, when there is one
    rank_NNNNN.pt       per rank: every per-rank state, by name (RNG, telemetry windows); with
                        another process count each state re-shards them (load_resharded_state)
    tokenizer/          the tokenizer the run trains with
    config.yaml         the resolved config
    train_state.json    format, world size, step, and every shared state by name (written last)

Every ``.pt`` file holds only tensors and plain Python values and is read back with
``torch.load(weights_only=True)``: a checkpoint cannot run code when loaded.

It is written into a hidden temporary sibling, fsynced, and renamed into place by the main rank
(transformers' ``tmp-checkpoint-*``): a folder named ``step_*`` is therefore always complete, and
only one with ``train_state.json`` counts (torchtitan's rule), so a SIGKILL at any moment of a
save leaves at worst a ``.tmp-*`` folder that nothing reads and the next save removes.
"""

import contextlib
import json
import math
import pickle
import random
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from mmtrain.checkpoint_weights import load_weights, save_weights
from mmtrain.config import CheckpointConfig, Config
from mmtrain.errors import CheckpointError
from mmtrain.fsio import TMP_PREFIX, replace_dir

STATE_FILE = "train_state.json"
FORMAT_VERSION = 2  # 2: component states by name (1: one flat train state)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Set this process's RNG states from :func:`capture_rng`'s output."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def safe_load(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)``, with a refusal that names the file instead of a traceback."""
    try:
        with warnings.catch_warnings():  # torch's note about foreign pickle protocols: we say it better below
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; resume from another one") from None
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} cannot be loaded safely: it holds pickled objects other than tensors and "
                              "plain values, which mmtrain never writes, and loading it could run code. Resume from "
                              "a checkpoint you trust") from None
    except (RuntimeError, EOFError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} cannot be loaded safely ({reason}); it was not written by mmtrain or is "
                              "damaged: resume from another checkpoint") from None


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Leave every RNG stream as it was: set-up work (a W&B run, the media batch) inside it cannot
    shift the streams the training steps draw from, fresh or resumed."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Resharding:
    """A checkpoint written by ``saved_world_size`` processes, loaded by ``world_size`` others: what a
    per-rank state needs to re-derive or merge its saved per-rank states for rank ``rank``."""

    saved_world_size: int
    world_size: int
    rank: int
    seed: int  # train.seed
    step: int  # the checkpoint's optimizer step


def derived_rng_seed(seed: int, step: int, rank: int) -> int:
    """The 64-bit seed of rank ``rank``'s RNG streams after an elastic resume at optimizer ``step``:
    NumPy's SeedSequence of (train.seed, step, rank), so that each (run, step, rank) gets its own
    well-separated stream, the same on every resume of that checkpoint with that layout."""
    low, high = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return int(low) | int(high) << 32


class RNGState:
    """This rank's RNG streams as a registrable state (per rank: each rank draws its own dropout)."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state)

    def load_resharded_state(self, saved: list[dict[str, Any]], resharding: Resharding) -> None:
        """Another number of processes: the saved streams cannot map one-to-one onto the new ranks,
        so every stream (Python, NumPy, torch CPU and CUDA) is re-seeded with
        :func:`derived_rng_seed` (train.seed, the checkpoint's optimizer step, the new rank)."""
        seed = derived_rng_seed(resharding.seed, resharding.step, resharding.rank)
        random.seed(seed)
        np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
        torch.manual_seed(seed)  # CPU and every CUDA device


@dataclass
class TrainState:
    """The run's progress (``train_state`` in a checkpoint's train_state.json)."""

    optimizer_step: int = 0
    epoch: int = 0                 # epochs completed
    batches_in_epoch: int = 0      # micro-batches of epoch `epoch` already trained on, per rank
    samples_seen: int = 0
    best_val_loss: float = math.inf
    best_val_epoch: int = -1
    nonfinite_steps: int = 0
    train_time_seconds: float = 0.0  # in earlier sessions of this run (a resumed run has several)

    def __post_init__(self) -> None:
        self.session_start = time.perf_counter()  # not a field: restarted by each session

    def train_time(self) -> float:
        """Seconds spent training, over every session of this run."""
        return self.train_time_seconds + time.perf_counter() - self.session_start

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self), "train_time_seconds": self.train_time()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, state.get(f.name, f.default))


@dataclass
class TrainingObjects:
    """The tensors a checkpoint saves as files of their own, besides the registered states."""

    model: torch.nn.Module  # unwrapped
    optimizer: Any
    scheduler: Any
    scaler: Any
    tokenizer: Any
    config: Config


def read_train_state(path: Path) -> dict[str, Any]:
    """The JSON state of a complete checkpoint, or a CheckpointError naming what is wrong."""
    state_file = Path(path) / STATE_FILE
    if not Path(path).is_dir():
        raise CheckpointError(f"train.resume={str(path)!r} is not a folder; give a checkpoint folder "
                              "(output_dir/checkpoints/step_*), auto or none")
    if not state_file.is_file():
        raise CheckpointError(f"train.resume={str(path)!r} is not a complete mmtrain checkpoint (no {STATE_FILE}); "
                              "it may be from a save that was interrupted: resume from another one, or use auto")
    try:
        meta = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_file}: not valid JSON ({e}); resume from another checkpoint") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{state_file}: checkpoint format {meta.get('format')!r}, this mmtrain reads "
                              f"format {FORMAT_VERSION}; resume it with the mmtrain version that wrote it")
    return meta


def complete_checkpoints(root: Path) -> list[Path]:
    """The valid checkpoints under ``root``, oldest first: a ``step_*`` folder counts only once its
    ``train_state.json`` exists (it is written last)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())


def find_resume(accelerator: Accelerator, root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from for ``train.resume`` (auto: the newest under ``root``).
    Collective: the main rank decides (its view of the file system wins) and broadcasts the
    decision, or the CheckpointError, to all."""
    decision: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            if resume == "auto":
                found = complete_checkpoints(root)
                decision = [str(found[-1]) if found else None]
            elif resume != "none":
                path = Path(resume).expanduser()
                read_train_state(path)
                decision = [str(path)]
        except CheckpointError as e:
            decision = [e]
    if accelerator.num_processes > 1:
        broadcast_object_list(decision)
    if isinstance(decision[0], CheckpointError):
        raise decision[0]
    return Path(decision[0]) if decision[0] is not None else None


class CheckpointManager:
    """Owns the checkpoint folder and the save policy, and saves/restores every registered state.

    ``states`` are shared by all ranks (the main rank writes them into ``train_state.json``);
    ``rank_states`` differ per rank (each rank writes its own ``rank_NNNNN.pt``).
    """

    def __init__(self, accelerator: Accelerator, root: Path, cfg: CheckpointConfig, objects: TrainingObjects,
                 states: Mapping[str, Stateful], rank_states: Mapping[str, Stateful]) -> None:
        self.accelerator, self.root, self.cfg, self.objects = accelerator, Path(root), cfg, objects
        self.states, self.rank_states = dict(states), dict(rank_states)
        self.last_saved_step = -1
        self.last_save_time = time.monotonic()

    # ------------------------------------------------------------------------------- the policy

    def timer_due(self) -> bool:
        """This rank's clock says ``checkpoint.every_minutes`` have passed since the last save (the
        ranks agree on it before acting: clocks and step times differ)."""
        minutes = self.cfg.every_minutes
        return bool(minutes) and time.monotonic() - self.last_save_time >= 60.0 * minutes

    def should_save(self, step: int, epoch_end: bool = False, stop: bool = False, timer_due: bool = False) -> bool:
        """Is a checkpoint due after optimizer ``step``? At an epoch end (after its validation), on
        an agreed stop, every ``checkpoint.every_steps`` steps, or when the agreed timer is due;
        never twice for the same step."""
        if step == self.last_saved_step:
            return False
        every = self.cfg.every_steps
        return epoch_end or stop or timer_due or bool(every and step % every == 0)

    # -------------------------------------------------------------------------------- the folder

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[Path]:
        """Valid checkpoints, oldest first."""
        return complete_checkpoints(self.root)

    def latest_text(self) -> str:
        """The newest complete checkpoint, for messages: a path, or 'none yet'."""
        found = self.complete()
        return str(found[-1]) if found else "none yet"

    # ------------------------------------------------------------------------------ save / load

    def save(self, step: int) -> Path:
        """Collective: every rank must call it (each writes its own rank file). Writes the
        checkpoint of ``step`` unless it exists already; returns its path."""
        acc = self.accelerator
        final = self.path_for(step)
        if step == self.last_saved_step:
            return final
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        save_weights(acc, self.objects.model, self.objects.optimizer, tmp)
        torch.save({name: s.state_dict() for name, s in self.rank_states.items()},
                   tmp / f"rank_{acc.process_index:05d}.pt")
        if acc.is_main_process:
            self.write_shared(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.commit(tmp, final, {"step": step, **{name: s.state_dict() for name, s in self.states.items()}})
        acc.wait_for_everyone()
        self.last_saved_step, self.last_save_time = step, time.monotonic()
        return final

    def write_shared(self, tmp: Path) -> None:
        """The main rank's files besides the weights: schedule, scaler, tokenizer, config."""
        o = self.objects
        torch.save(o.scheduler.state_dict(), tmp / "scheduler.pt")
        if o.scaler is not None:
            torch.save(o.scaler.state_dict(), tmp / "scaler.pt")
        o.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        o.config.dump(tmp / "config.yaml")

    def commit(self, tmp: Path, final: Path, shared: dict[str, Any]) -> None:
        """The validity marker last, then the atomic rename, then pruning to the last k."""
        meta = {"format": FORMAT_VERSION, "world_size": self.accelerator.num_processes, **shared}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2, default=_json_number))
        replace_dir(tmp, final)
        for stale in self.complete()[:-self.cfg.keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
        # Left by a save that was killed: a temporary folder, or the old copy of a replaced step.
        for partial in [*self.root.glob(f"{TMP_PREFIX}*"), *self.root.glob(".step_*.old")]:
            shutil.rmtree(partial, ignore_errors=True)

    def restore(self, path: Path) -> dict[str, Any]:
        """Load the checkpoint at ``path`` into the training objects and every registered state, in
        place; returns its ``train_state.json``. Every rank reads the shared files itself (no
        broadcast of large tensors). RNG streams are restored too: set-up work done after this
        belongs inside :func:`rng_preserved`.

        A checkpoint of another process count (an elastic resume) loads the same weights, optimizer,
        schedule and shared states; the per-rank states go through :meth:`load_resharded`. Raises
        CheckpointError when a file is missing or unsafe."""
        meta = read_train_state(path)
        acc, o = self.accelerator, self.objects
        device = torch.device("cpu") if acc.device.type == "cpu" else acc.device  # loaders refuse "cpu:0"
        saved_world = int(meta["world_size"])
        # Every rank file is read before anything is loaded: a missing one refuses the checkpoint intact.
        ranks = [safe_load(path / f"rank_{r:05d}.pt") for r in
                 ([acc.process_index] if saved_world == acc.num_processes else range(saved_world))]
        load_weights(acc, o.model, o.optimizer, path, device)
        o.scheduler.load_state_dict(safe_load(path / "scheduler.pt"))
        if o.scaler is not None and (path / "scaler.pt").is_file():
            o.scaler.load_state_dict(safe_load(path / "scaler.pt"))
        for name, state in self.states.items():
            state.load_state_dict(meta.get(name, {}))
        if saved_world == acc.num_processes:  # the same layout: each rank continues its own streams exactly
            for name, state in self.rank_states.items():
                state.load_state_dict(ranks[0][name])
        else:
            self.load_resharded(path, ranks, Resharding(saved_world, acc.num_processes, acc.process_index,
                                                        o.config.train.seed, int(meta["step"])))
        self.last_saved_step = meta["step"]
        return meta

    def load_resharded(self, path: Path, ranks: list[dict[str, Any]], resharding: Resharding) -> None:
        """Per-rank states written by another number of processes: each state's own
        ``load_resharded_state`` (RNG: re-derived; telemetry windows: merged into rank 0)."""
        for name, state in self.rank_states.items():
            load = getattr(state, "load_resharded_state", None)
            if load is None:  # a per-rank state with no rule for a new process count: refuse, not guess
                raise CheckpointError(
                    f"{path} was written by {resharding.saved_world_size} process(es) and this run has "
                    f"{resharding.world_size}; its per-rank state {name!r} cannot be re-sharded. Resume with "
                    f"{resharding.saved_world_size} process(es)")
            load([r[name] for r in ranks], resharding)


def _json_number(value: Any) -> Any:
    """JSON for what ``json`` cannot write itself: 0-d tensors and numpy scalars as numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
