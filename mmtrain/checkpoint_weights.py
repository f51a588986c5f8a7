"""The model and optimizer tensors of a checkpoint: how they are written and read back.

Separate from :mod:`mmtrain.checkpoint` (which owns the policy, the folder and the commit protocol)
because their layout depends on how the model is distributed:

- DDP (and one process): every rank holds the same full tensors and the main rank alone writes
  ``model.safetensors`` and ``optimizer.pt``;
- FSDP: each rank holds a shard, and every rank writes its own with ``torch.distributed.checkpoint``
  (DCP) into ``weights/`` (``__R_0.distcp`` per rank plus a ``.metadata`` index): the model's and
  the optimizer's sharded state dicts under the keys ``model`` and ``optimizer``, by parameter name.

Both functions are collective: every rank calls them at the same point, inside the checkpoint's
temporary folder, before the commit. A checkpoint of either layout loads into a run of either
layout: DCP re-shards ``weights/`` for any process count (or into full tensors), and the full
files load into an FSDP model through the state-dict API, which keeps only each rank's shard.
"""

import io
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.tensor import DTensor

from mmtrain.distributed import is_sharded
from mmtrain.errors import CheckpointError

MODEL_FILE, OPTIMIZER_FILE = "model.safetensors", "optimizer.pt"
SHARDED_DIR = "weights"  # the DCP folder of an FSDP checkpoint


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (the state-dict API wants it)."""
    return getattr(optimizer, "optimizer", optimizer)


def save_weights(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, folder: Path) -> None:
    """Collective. Write ``model`` (unwrapped) and ``optimizer`` into ``folder``.

    DDP: the main rank writes ``model.safetensors`` and ``optimizer.pt`` (identical on every rank
    after DDP's all-reduce). FSDP: every rank writes its shards into ``folder/weights`` with DCP
    (no rank ever holds the full tensors).
    """
    if is_sharded(accelerator):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, _torch_optimizer(optimizer))
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=folder / SHARDED_DIR)
        return
    if accelerator.is_main_process:
        save_model(model, str(folder / MODEL_FILE))  # de-duplicates the tied embedding
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)


def load_weights(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, folder: Path,
                 device: torch.device) -> None:
    """Collective. Load what :func:`save_weights` wrote in ``folder`` (under either layout) into
    ``model`` and ``optimizer``, on ``device``; every rank reads the files itself (no broadcast of
    large tensors). Raises CheckpointError naming the file when it is missing, damaged or does not
    fit."""
    if (folder / SHARDED_DIR).is_dir():
        _load_sharded(model, optimizer, folder / SHARDED_DIR)
    elif is_sharded(accelerator):
        _load_full_into_sharded(model, optimizer, folder, device)
    else:
        _load_full(model, optimizer, folder, device)


def _load_full(model: torch.nn.Module, optimizer: Any, folder: Path, device: torch.device) -> None:
    """``model.safetensors`` + ``optimizer.pt`` into an unsharded model (DDP, one process)."""
    from mmtrain.checkpoint import safe_load  # the one safe torch.load, kept beside the other checkpoint files

    path = folder / MODEL_FILE
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=str(device))
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"{path} cannot be loaded ({e}); resume from another checkpoint") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit this model (missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]})")
    optimizer.load_state_dict(safe_load(folder / OPTIMIZER_FILE, device))


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file allowing only what DCP writes there: its own metadata
    classes, torch.Size and torch's dtype/layout/memory-format constants, paths and plain containers.
    DCP reads that file with a bare ``pickle.load``, which would run whatever a crafted file names."""

    _BUILTINS = frozenset({"set", "frozenset", "slice", "list", "dict", "tuple", "bytes", "bytearray"})
    # Exactly the classes DCP's Metadata is made of (torch 2.14), not the whole package: a package-wide
    # rule let a crafted file build an object whose unpickling starts a process (found in review).
    _DCP = frozenset({("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")}
        | {("torch.distributed.checkpoint.filesystem", "_StorageInfo")})

    def find_class(self, module: str, name: str) -> Any:
        allowed = ((module, name) in self._DCP or (module, name) == ("torch", "Size")
                   or (module == "builtins" and name in self._BUILTINS)
                   or (module, name) == ("collections", "OrderedDict")
                   or (module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath",
                                                        "PureWindowsPath"))  # the checkpoint_id it was saved at
                   or (module == "torch" and isinstance(getattr(torch, name, None),
                                                        torch.dtype | torch.layout | torch.memory_format)))
        # The one function: how torch pickles a layout (a name -> torch.layout lookup).
        safe_function = (module, name) == ("torch.serialization", "_get_layout")
        obj = super().find_class(module, name) if allowed or safe_function else None
        if obj is None or not (isinstance(obj, type) or module == "torch" or safe_function):  # no other functions
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint")
        return obj


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, except that non-tensor items (the optimizer's param_groups, step counts) are
    read with ``torch.load(weights_only=True)``, like every other file of a checkpoint; DCP's own
    uses ``weights_only=False``. The object is re-serialized for the parent, which then reads only
    what was already read safely."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"a non-tensor item of the checkpoint is unsafe to load ({e})") from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


class _SafeReader(FileSystemReader):
    """DCP's file reader, with the ``.metadata`` file checked by :class:`_MetadataUnpickler` first."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        with open(Path(self.path) / ".metadata", "rb") as f:
            _MetadataUnpickler(f).load()
        return super().read_metadata(*args, **kwargs)


def _load_sharded(model: torch.nn.Module, optimizer: Any, folder: Path) -> None:
    """A DCP ``weights/`` folder into ``model`` and ``optimizer``, sharded or not: DCP reads, for
    each tensor of this run's state dicts, the part this rank holds, whatever layout wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    opt = _torch_optimizer(optimizer)
    model_state, optim_state = get_state_dict(model, opt)  # the targets: this run's own layout
    state = {"model": model_state, "optimizer": optim_state}
    reader = _SafeReader(str(folder))
    try:
        metadata = reader.read_metadata()
    except Exception as e:  # missing, truncated (any unpickling error) or naming code to run
        raise CheckpointError(f"{folder / '.metadata'} cannot be read safely ({e}); resume from another "
                              "checkpoint") from None
    reshaped = _as_saved_shapes(state, metadata.state_dict_metadata)
    try:
        dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner())
    except Exception as e:  # DCP wraps every rank's failure (missing shard, wrong shape) in one exception
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder} cannot be loaded into this model ({first}); resume from another "
                              "checkpoint") from None
    for tree, key, shape in reshaped:
        tree[key] = tree[key].reshape(shape)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _as_saved_shapes(tree: dict[str, Any], saved: dict[str, Any], prefix: str = "") -> list[tuple[dict, str, Any]]:
    """Give each plain tensor of ``tree`` the saved shape where only the form differs (an FSDP
    checkpoint holds a scalar parameter as (1,), see :func:`mmtrain.distributed.scalars_as_vectors`;
    a DDP run's model wants ``()``). The new tensors are views, so DCP's in-place load fills the
    originals. Returns ``(tree, key, shape)`` for each, to restore the shape after loading. Keys are
    DCP's flattened ones: the nested dict keys joined by dots."""
    out: list[tuple[dict, str, Any]] = []
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out += _as_saved_shapes(value, saved, name)
        elif isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
            size = getattr(saved.get(name), "size", None)
            if size is not None and tuple(size) != tuple(value.shape) and math.prod(size) == value.numel():
                tree[key] = value.reshape(tuple(size))
                out.append((tree, key, value.shape))
    return out


def _load_full_into_sharded(model: torch.nn.Module, optimizer: Any, folder: Path, device: torch.device) -> None:
    """A DDP checkpoint's full files into an FSDP model: every rank reads them and keeps its shard
    (the state-dict API's full_state_dict option). ``optimizer.pt`` is keyed by parameter index in
    optimizer order; the API wants names, so the indices are mapped through this optimizer's groups
    (built from the same model in the same order)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from mmtrain.checkpoint import safe_load

    path = folder / MODEL_FILE
    try:
        full = load_file(str(path), device=str(device))
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"{path} cannot be loaded ({e}); resume from another checkpoint") from None
    names: dict[int, list[str]] = {}  # every name of each parameter (a tied one has several)
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    # save_model keeps one name of a tied tensor: give its other names the same tensor.
    for aliases in names.values():
        kept = [n for n in aliases if n in full]
        for n in aliases:
            if kept and n not in full:
                full[n] = full[kept[0]]
    # A scalar parameter is (1,) in an FSDP model (scalars_as_vectors) and () in the file.
    shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    full = {k: v.reshape(shapes[k]) if k in shapes and v.numel() == math.prod(shapes[k]) else v
            for k, v in full.items()}
    options = StateDictOptions(full_state_dict=True, strict=True)
    try:
        set_model_state_dict(model, full, options=options)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} does not fit this model ({str(e).splitlines()[0]})") from None
    opt = _torch_optimizer(optimizer)
    saved = safe_load(folder / OPTIMIZER_FILE, device)
    order = [names[id(p)][0] for group in opt.param_groups for p in group["params"]]
    if len(order) != sum(len(g["params"]) for g in saved["param_groups"]):
        raise CheckpointError(f"{folder / OPTIMIZER_FILE} does not fit this model's optimizer "
                              f"({len(order)} parameters here); resume from another checkpoint")
    def fit(name: str, values: dict[str, Any]) -> dict[str, Any]:  # per-parameter moments take its shape
        return {k: v.reshape(shapes[name]) if k != "step" and isinstance(v, torch.Tensor)
                and v.numel() == math.prod(shapes[name]) else v for k, v in values.items()}

    by_name = {"state": {order[i]: fit(order[i], s) for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, opt, by_name, options=options)
