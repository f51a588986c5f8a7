"""Secrets stay out of every output, and nothing in mmtrain unpickles untrusted files."""

import ast
import os
import secrets
from pathlib import Path

import pytest
import torch
import wandb
from conftest import REPO
from wandb_files import offline_runs

from mmtrain.cli import main

# Distinctive, unique to this test session: found anywhere means it leaked from here.
WANDB_SECRET = "fakekey" + secrets.token_hex(16) + "q"  # 40 characters, like a real W&B API key
HF_SECRET = "hf_faketoken" + secrets.token_hex(14)
assert len(WANDB_SECRET) == 40


def files_containing(root: Path, needles: list[str]) -> dict[str, list[str]]:
    """{file: [needles it contains]} for every file under ``root``, binary ones included; the
    needles as UTF-8 and UTF-16 (how Windows-minded tools and some protobuf readers store text)."""
    patterns = {n: (n.encode(), n.encode("utf-16-le")) for n in needles}
    found = {}
    for folder, _, names in os.walk(root):  # symlinks (wandb/latest-run) are not followed: no loops
        for name in names:
            path = Path(folder, name)
            if path.is_symlink():
                continue
            data = path.read_bytes()
            hits = [n for n, forms in patterns.items() if any(f in data for f in forms)]
            if hits:
                found[str(path.relative_to(root))] = hits
    return found


@pytest.fixture
def one_torch_thread():
    """A tiny model gains nothing from intra-op threads; on a busy 2-core machine they slow it down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_wandb_session(tmp_path, monkeypatch):
    """wandb reads its environment once per process session: start a new one so this test's key is
    really in it (as for a user who exported WANDB_API_KEY), and end it so the key goes no further."""
    home = tmp_path / "wandb-home"  # wandb's config, cache and data folders: scanned too
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    wandb.teardown()
    yield
    wandb.teardown()


def test_secrets_never_reach_the_outputs(tmp_path, monkeypatch, capfd, fresh_wandb_session, one_torch_thread):
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")  # and --wandb.mode offline: nothing may try the network
    modes, real_init = [], wandb.init

    def spy(*args, **kwargs):  # the real init; only records the mode it was asked for
        modes.append(kwargs["mode"])
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    out = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "configs" / "tiny.yaml"), "--train.output_dir", str(out),
                 "--train.epochs", "1", "--wandb.mode", "offline"]) == 0
    assert modes == ["offline"]
    assert wandb.setup().settings.api_key == WANDB_SECRET  # W&B did hold the key during the run
    wandb.teardown()  # waits for wandb-core to write out and close everything (run.finish does not)

    # The scan covers everything a run writes, W&B's binary run file and debug logs included.
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    for pattern in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/*/*", "model/*",
                    "wandb/debug.log", "wandb/debug-internal.log", "wandb/offline-run-*/run-*.wandb",
                    "wandb/offline-run-*/logs/debug*.log"):
        assert list(out.glob(pattern)), f"the run wrote no {pattern}: the scan would miss it"
    assert len(offline_runs(out)) == 1 and len(written) > 20
    assert files_containing(tmp_path, [WANDB_SECRET, HF_SECRET]) == {}  # the outputs and wandb's own folders
    wandb_dir = os.environ.get("WANDB_DIR")  # conftest's process-wide wandb folder
    if wandb_dir and Path(wandb_dir).is_dir():
        assert files_containing(Path(wandb_dir), [WANDB_SECRET, HF_SECRET]) == {}
    printed = capfd.readouterr()
    assert WANDB_SECRET not in printed.out + printed.err and HF_SECRET not in printed.out + printed.err

    # The scan itself finds a secret hidden in a binary file.
    (tmp_path / "control.bin").write_bytes(b"\x00\xff" + HF_SECRET.encode() + b"\x00")
    assert files_containing(tmp_path, [WANDB_SECRET, HF_SECRET]) == {"control.bin": [HF_SECRET]}


# ------------------------------------------------------------------------- deserialization

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib"}
UNPICKLERS = {"load", "loads", "Unpickler"}


def unsafe_loads(source: str) -> list[str]:
    """Every ``torch.load`` without ``weights_only=True`` and every pickle load in ``source``,
    through ``import torch as t`` / ``from torch import load`` aliases and bare references too."""
    tree = ast.parse(source)
    torch_names, torch_load_names, pickle_names, pickle_load_names = {"torch"}, set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch":
                    torch_names.add(alias.asname or "torch")
                elif alias.name in PICKLE_MODULES:
                    pickle_names.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if node.module in ("torch", "torch.serialization") and alias.name == "load":
                    torch_load_names.add(alias.asname or "load")
                elif node.module in PICKLE_MODULES and alias.name in UNPICKLERS:
                    pickle_load_names.add(alias.asname or alias.name)

    def is_torch_load(expr: ast.expr) -> bool:
        if isinstance(expr, ast.Name):
            return expr.id in torch_load_names
        if isinstance(expr, ast.Attribute) and expr.attr == "load":
            base = expr.value  # torch.load, or torch.serialization.load
            if isinstance(base, ast.Attribute) and base.attr == "serialization":
                base = base.value
            return isinstance(base, ast.Name) and base.id in torch_names
        return False

    safe, problems = set(), []
    for node in ast.walk(tree):
        # The pickle docs' "Restricting Globals": an Unpickler subclass whose find_class decides
        # what may be loaded is the safe form of an unpickler (checkpoint_weights.py's DCP metadata).
        if isinstance(node, ast.ClassDef) and any(isinstance(f, ast.FunctionDef) and f.name == "find_class"
                                                  for f in node.body):
            safe.update(id(base) for base in node.bases)
        if isinstance(node, ast.Call) and is_torch_load(node.func):
            flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            if isinstance(flag, ast.Constant) and flag.value is True:
                safe.add(id(node.func))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)) and is_torch_load(node) and id(node) not in safe:
            problems.append(f"line {node.lineno}: torch.load without weights_only=True")
        elif id(node) in safe:
            continue
        elif (isinstance(node, ast.Attribute) and node.attr in UNPICKLERS and isinstance(node.value, ast.Name)
              and node.value.id in pickle_names) or (isinstance(node, ast.Name) and node.id in pickle_load_names
                                                    and isinstance(node.ctx, ast.Load)):
            problems.append(f"line {node.lineno}: pickle load")
    return problems


@pytest.mark.parametrize(("source", "bad"), [
    ("import torch\ntorch.load(p, weights_only=True)", False),
    ("import torch\ntorch.load(p, map_location='cpu', weights_only=True)", False),
    ("import torch\ntorch.load(p)", True),
    ("import torch\ntorch.load(p, weights_only=False)", True),
    ("import torch\ntorch.load(p, weights_only=flag)", True),
    ("import torch\ntorch.load(p, **options)", True),
    ("import torch as t\nt.load(p)", True),
    ("from torch import load\nload(p)", True),
    ("from torch import load as tl\ntl(p, weights_only=True)", False),
    ("import torch\nreader = torch.load\nreader(p, weights_only=True)", True),
    ("import torch\ntorch.serialization.load(p)", True),
    ("import pickle\npickle.loads(b)", True),
    ("import pickle as pk\npk.load(f)", True),
    ("from pickle import loads\nloads(b)", True),
    ("import pickle\npickle.dumps(x)", False),
    ("import json\njson.load(f)", False),
    ("import pickle\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n        raise E", False),
    ("import pickle\nclass U(pickle.Unpickler):\n    pass", True),
    ("import pickle\npickle.Unpickler(f).load()", True),
])
def test_the_load_scanner(source, bad):
    assert bool(unsafe_loads(source)) is bad


def test_mmtrain_loads_no_pickles():
    """Checkpoints are data, never code: torch.load(weights_only=True) only, no pickle loads."""
    files = sorted((REPO / "mmtrain").rglob("*.py"))
    assert files
    problems = [f"{path.relative_to(REPO)} {p}" for path in files for p in unsafe_loads(path.read_text())]
    assert problems == []
