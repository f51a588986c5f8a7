"""A W&B sweep YAML (``wandb sweep`` format) read for ``mmtrain sweep``: validated, expanded into trials.

* :func:`load_sweep` parses and checks the file: ``method`` (grid, random, bayes), ``metric``, ``parameters``
  named by mmtrain's dotted config fields (``optim.lr``), ``command`` with W&B's macros.
* :meth:`SweepSpec.grid` lists the grid in order (the last parameter in the YAML varies fastest, like nested
  loops written top to bottom); :meth:`SweepSpec.sample` draws random trial ``i`` reproducibly from a seed.
* :meth:`Param.optuna_distribution` is what bayes (Optuna TPE) searches; categorical values that are lists or
  mappings (``wandb.tags: {values: [[a, b], [c]]}``) are searched as their JSON text (:meth:`Param.to_optuna`).
* :meth:`SweepSpec.trial_argv` expands ``command`` for one trial, as ``wandb agent`` would, with the local
  interpreter for ``${interpreter}`` and for ``mmtrain`` / ``accelerate launch`` at the program position.

Every problem is a UserError naming the file, the key and the fix (exit 2, one line).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmtrain.config import iter_fields
from mmtrain.errors import UserError

METHODS = ("grid", "random", "bayes")
# W&B's sweep keys; the ones mmtrain's local runner does not use are accepted and ignored.
KNOWN_KEYS = {"name", "description", "program", "command", "method", "metric", "parameters", "early_terminate",
              "run_cap", "project", "entity", "controller", "apiVersion", "job", "image_uri"}
# W&B distributions -> the keys each one reads (defaults as in W&B's sweep config schema).
DISTRIBUTIONS = {
    "constant": ("value",), "categorical": ("values", "probabilities"),
    "int_uniform": ("min", "max"), "uniform": ("min", "max"), "q_uniform": ("min", "max", "q"),
    "log_uniform": ("min", "max"), "q_log_uniform": ("min", "max", "q"),
    "log_uniform_values": ("min", "max"), "q_log_uniform_values": ("min", "max", "q"),
    "normal": ("mu", "sigma"), "q_normal": ("mu", "sigma", "q"),
    "log_normal": ("mu", "sigma"), "q_log_normal": ("mu", "sigma", "q"),
    "beta": ("a", "b"), "q_beta": ("a", "b", "q"),
}
W_AND_B_ONLY = ("inv_log_uniform", "inv_log_uniform_values")
DEFAULTS = {"mu": 0.0, "sigma": 1.0, "q": 1.0, "a": 1.0, "b": 1.0}
BAYES_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                       "log_uniform_values")
ARG_MACROS = ("args", "args_no_hyphens", "args_no_equals", "args_json", "args_json_file")
ENVVAR = re.compile(r"\$\{envvar:([A-Za-z0-9_]*)\}")


@dataclass
class Param:
    """One sweep parameter: ``name`` (``section.field``), its W&B ``distribution`` and that distribution's keys."""

    name: str
    distribution: str
    spec: dict[str, Any]

    def grid_values(self) -> list[Any] | None:
        """The values a grid visits, or None when the distribution is continuous."""
        s = self.spec
        if self.distribution == "constant":
            return [s["value"]]
        if self.distribution == "categorical":
            return list(s["values"])
        if self.distribution == "int_uniform":
            return list(range(int(s["min"]), int(s["max"]) + 1))
        if self.distribution == "q_uniform":
            n = math.floor((s["max"] - s["min"]) / s["q"] + 1e-9)
            return [_quantize(s["min"] + k * s["q"], s["q"]) for k in range(n + 1)]
        return None

    def sample(self, rng: random.Random) -> Any:
        """One draw, as W&B's random search draws it (``log_uniform``'s min/max are natural-log exponents)."""
        s, d = self.spec, self.distribution
        if d == "constant":
            return s["value"]
        if d == "categorical":
            return rng.choices(s["values"], weights=s.get("probabilities"))[0]
        if d == "int_uniform":
            return rng.randint(int(s["min"]), int(s["max"]))
        base = d.removeprefix("q_")
        if base == "uniform":
            x = rng.uniform(s["min"], s["max"])
        elif base == "log_uniform":
            x = math.exp(rng.uniform(s["min"], s["max"]))
        elif base == "log_uniform_values":
            x = math.exp(rng.uniform(math.log(s["min"]), math.log(s["max"])))
        elif base == "normal":
            x = rng.gauss(s["mu"], s["sigma"])
        elif base == "log_normal":
            x = math.exp(rng.gauss(s["mu"], s["sigma"]))
        else:  # beta
            x = rng.betavariate(s["a"], s["b"])
        return _quantize(x, s["q"]) if d.startswith("q_") else x

    def _choices(self) -> list[Any] | None:
        """The JSON text of each categorical value when one is a list or a mapping (wandb.tags: {values: [[a, b],
        [c]]}), which Optuna would store only with a warning per value; else None (the values themselves)."""
        values = self.spec.get("values") if self.distribution == "categorical" else None
        if values is None or all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            return None
        return [json.dumps(v, sort_keys=True, default=str) for v in values]

    def to_optuna(self, value: Any) -> Any:
        """``value`` as the Optuna distribution has it (its JSON text where :meth:`_choices` says so)."""
        choices = self._choices()
        return value if choices is None else choices[self.spec["values"].index(value)]

    def from_optuna(self, value: Any) -> Any:
        """The value an Optuna suggestion stands for (:meth:`to_optuna` undone)."""
        choices = self._choices()
        return value if choices is None else self.spec["values"][choices.index(value)]

    def optuna_distribution(self):  # -> optuna BaseDistribution
        """The Optuna distribution TPE searches (bayes); constants are not searched."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        s, d = self.spec, self.distribution
        if d == "categorical":
            return CategoricalDistribution(self._choices() or s["values"])
        if d == "int_uniform":
            return IntDistribution(int(s["min"]), int(s["max"]))
        if d == "q_uniform":
            return FloatDistribution(s["min"], s["max"], step=s["q"])
        if d == "log_uniform":
            return FloatDistribution(math.exp(s["min"]), math.exp(s["max"]), log=True)
        return FloatDistribution(s["min"], s["max"], log=d == "log_uniform_values")


def _quantize(x: float, q: float) -> float | int:
    """``round(x / q) * q`` (W&B's q_*), an int when q is whole, else rounded off float noise (0.30000000000000004)."""
    value = round(x / q) * q
    return int(value) if float(q).is_integer() else round(value, 12)


@dataclass
class SweepSpec:
    """A parsed sweep file. ``raw`` is the YAML as parsed; ``digest`` its sha256 (comments and layout aside)."""

    path: Path
    name: str
    method: str
    metric: str
    goal: str
    params: list[Param]
    command: list[str]
    program: str | None
    raw: dict[str, Any] = field(repr=False)
    digest: str = ""

    @property
    def searched(self) -> list[Param]:
        return [p for p in self.params if p.distribution != "constant"]

    def grid(self) -> list[dict[str, Any]]:
        """Every grid point, the last parameter varying fastest (so a grid of batch size x lr x seed starts
        with one batch size, one lr and every seed)."""
        points: list[dict[str, Any]] = [{}]
        for p in self.params:
            points = [{**point, p.name: v} for point in points for v in p.grid_values()]
        return points

    def sample(self, index: int, seed: int) -> dict[str, Any]:
        """Random trial ``index``: a function of (seed, index) only, so a re-run draws the same trials."""
        rng = random.Random(f"mmtrain-sweep/{seed}/{index}")  # str seeds are hashed with sha512: stable
        return {p.name: p.sample(rng) for p in self.params}

    def trial_argv(self, params: dict[str, Any], json_file: Path) -> list[str]:
        """``command`` expanded for one trial as ``wandb agent`` expands it: ``${args}`` -> ``--optim.lr=0.001``
        tokens (``str()`` of each value, W&B's format), ``${env}`` dropped (the agent's ``/usr/bin/env``),
        ``${interpreter}`` and a leading ``mmtrain`` / ``accelerate launch`` run by this interpreter (so this
        venv is used). ``${args_json_file}`` becomes ``json_file``, which the caller writes."""
        expanded = {
            "args": [f"--{k}={v}" for k, v in params.items()],
            "args_no_hyphens": [f"{k}={v}" for k, v in params.items()],
            "args_no_equals": [t for k, v in params.items() for t in (f"--{k}", str(v))],
            "args_json": [json.dumps(params)],
            "args_json_file": [str(json_file)],
            "interpreter": [sys.executable],
            "program": [self.program] if self.program else [],
            "env": [],
        }
        argv: list[str] = []
        for token in self.command:
            if token.startswith("${") and token.endswith("}") and token[2:-1] in expanded:
                argv += expanded[token[2:-1]]
            else:
                argv.append(ENVVAR.sub(lambda m: os.environ.get(m.group(1), m.group(1)), token))
        if argv[:1] == ["mmtrain"]:
            argv[:1] = [sys.executable, "-m", "mmtrain"]
        elif argv[:2] == ["accelerate", "launch"]:
            argv[:2] = [sys.executable, "-m", "accelerate.commands.launch"]
        return argv


def _fail(path: Path, where: str, problem: str) -> UserError:
    return UserError(f"{path}: {where}: {problem}")


def _number(path: Path, where: str, value: Any) -> float:
    try:
        number = float(value)  # YAML reads 1e-4 (no dot) as text: accept it as W&B's server does
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise _fail(path, where, f"{value!r} is not a finite number")
    return int(number) if isinstance(value, int) else number


def _param(path: Path, name: str, raw: Any, fields: set[str]) -> Param:
    where = f"parameters.{name}"
    if isinstance(raw, dict) and "parameters" in raw:
        raise _fail(path, where, "nested parameters are not supported by `mmtrain sweep`; give each field its own "
                                 "dotted name (optim.lr, train.batch_size)")
    if name not in fields:
        close = [f for f in fields if f.split(".")[-1] == name.split(".")[-1]]
        hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
        raise _fail(path, where, f"{name!r} is not an mmtrain config field{hint}; name parameters by their "
                                 "section.field, as `mmtrain train --help` lists them")
    if name == "train.output_dir":
        raise _fail(path, where, "the sweep gives each trial its own output_dir; remove this parameter")
    if not isinstance(raw, dict):
        raise _fail(path, where, "must be a mapping such as {values: [...]} or {min: ..., max: ...}")
    distribution = raw.get("distribution")
    if distribution is None:  # W&B's inference
        if "value" in raw:
            distribution = "constant"
        elif "values" in raw:
            distribution = "categorical"
        elif "min" in raw and "max" in raw:
            ints = all(isinstance(raw[k], int) and not isinstance(raw[k], bool) for k in ("min", "max"))
            distribution = "int_uniform" if ints else "uniform"
        else:
            raise _fail(path, where, "give value, values, or min and max (with an optional distribution)")
    if distribution in W_AND_B_ONLY:
        raise _fail(path, where, f"distribution {distribution} runs only on W&B's server; for `mmtrain sweep` use "
                                 "log_uniform_values")
    if distribution not in DISTRIBUTIONS:
        raise _fail(path, where, f"unknown distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)}")
    keys = DISTRIBUTIONS[distribution]
    unknown = set(raw) - set(keys) - {"distribution"}
    if unknown:
        raise _fail(path, where, f"{', '.join(sorted(unknown))} not used by distribution {distribution} "
                                 f"(it reads {', '.join(keys)})")
    spec: dict[str, Any] = {}
    for key in keys:
        if key in raw:
            spec[key] = raw[key] if key in ("value", "values", "probabilities") else _number(path, f"{where}.{key}",
                                                                                              raw[key])
        elif key in DEFAULTS:
            spec[key] = DEFAULTS[key]
        elif key != "probabilities":
            raise _fail(path, where, f"distribution {distribution} needs {key}")
    if distribution == "categorical":
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise _fail(path, f"{where}.values", "must be a non-empty list")
        probs = raw.get("probabilities")
        if probs is not None:
            probs = [_number(path, f"{where}.probabilities", p) for p in probs] if isinstance(probs, list) else None
            if probs is None or len(probs) != len(values) or abs(sum(probs) - 1) > 1e-6 or min(probs) < 0:
                raise _fail(path, f"{where}.probabilities", "must be one non-negative number per value, summing to 1")
            spec["probabilities"] = probs
    if "min" in spec and spec["min"] >= spec["max"]:
        raise _fail(path, where, f"min {spec['min']} must be below max {spec['max']}")
    if distribution in ("log_uniform_values", "q_log_uniform_values") and spec["min"] <= 0:
        raise _fail(path, f"{where}.min", f"{distribution} needs min > 0 (the values themselves; log_uniform takes "
                                          "natural-log exponents)")
    if spec.get("q", 1) <= 0 or spec.get("sigma", 1) <= 0 or spec.get("a", 1) <= 0 or spec.get("b", 1) <= 0:
        raise _fail(path, where, "q, sigma, a and b must be > 0")
    return Param(name, distribution, spec)


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such sweep file; give the path of a W&B sweep YAML (configs/sweep.yaml)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read this file ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{at}; fix the syntax there") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a sweep file is a mapping with method, metric, parameters and command")
    return raw


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep YAML. Raises UserError naming the file, the key and the fix."""
    path = Path(path)
    raw = _read(path)
    unknown = set(raw) - KNOWN_KEYS
    if unknown:
        raise _fail(path, ", ".join(sorted(unknown)),
                    f"not a W&B sweep key; the keys are {', '.join(sorted(KNOWN_KEYS))}")
    method = raw.get("method")
    if method not in METHODS:
        raise _fail(path, "method", f"{method!r}: use grid, random or bayes")
    metric = raw.get("metric") or {}
    if not isinstance(metric, dict) or ("metric" in raw and not metric.get("name")):
        raise _fail(path, "metric", "give {name: final_validation_loss, goal: minimize}")
    if method == "bayes" and not metric:
        raise _fail(path, "metric", "bayes needs a metric to optimise: {name: final_validation_loss, goal: minimize}")
    goal = metric.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        raise _fail(path, "metric.goal", f"{goal!r}: use minimize or maximize")
    params_raw = raw.get("parameters")
    if not isinstance(params_raw, dict) or not params_raw:
        raise _fail(path, "parameters", "give at least one parameter, e.g. optim.lr: {values: [0.001, 0.0005]}")
    fields = {name for name, _, _ in iter_fields()}
    params = [_param(path, str(name), spec, fields) for name, spec in params_raw.items()]
    command = raw.get("command", ["${env}", "${interpreter}", "${program}", "${args}"])  # W&B's default
    if not isinstance(command, list) or not command or not all(isinstance(t, (str, int, float)) for t in command):
        raise _fail(path, "command", "must be a list of words, one token per item, ending in ${args}")
    command = [str(t) for t in command]
    for token in command:
        if token.startswith("${") and token.endswith("}") and token[2:-1] not in (*ARG_MACROS, "env", "interpreter",
                                                                                   "program"):
            raise _fail(path, "command", f"unknown macro {token}; W&B's are ${{env}}, ${{interpreter}}, ${{program}}, "
                                         "${args}, ${args_no_hyphens}, ${args_json}, ${args_json_file}")
    if not any(t[2:-1] in ARG_MACROS for t in command if t.startswith("${")):
        raise _fail(path, "command", "has no ${args}: the trials would never receive their parameters; end it with "
                                     "${args}")
    program = raw.get("program")
    if "${program}" in command and not program:
        raise _fail(path, "program", "the command uses ${program} but no program is given")
    if method == "bayes":
        for p in params:
            if p.distribution not in BAYES_DISTRIBUTIONS:
                raise _fail(path, f"parameters.{p.name}", f"bayes (Optuna TPE) searches bounded distributions only: "
                                                          f"{', '.join(BAYES_DISTRIBUTIONS)}; use method random for "
                                                          f"{p.distribution}")
    if method == "grid":
        for p in params:
            if p.grid_values() is None:
                raise _fail(path, f"parameters.{p.name}", f"a grid needs discrete values (values, value, int_uniform "
                                                          f"or q_uniform), not {p.distribution}; or use method random")
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1):
        raise _fail(path, "run_cap", f"{run_cap!r} must be a whole number >= 1 (the most trials to run)")
    name = str(raw.get("name") or path.stem)
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()
    return SweepSpec(path, name, method, str(metric.get("name", "final_validation_loss")), goal, params, command,
                     str(program) if program else None, raw, digest)
