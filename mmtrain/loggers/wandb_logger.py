"""The ``wandb`` sink: the only module that knows W&B. Main process only.

W&B problems (no network, no credentials, a failing or hanging call) degrade to offline or
disabled with one warning and never stop training; metrics.jsonl (the ``jsonl`` sink) has every
record regardless. The mode rules (``wandb.mode`` against ``WANDB_MODE`` and the credentials) are
:func:`resolve_mode`.
"""

import contextlib
import itertools
import netrc
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mmtrain.config import WandbConfig
from mmtrain.errors import shell_word
from mmtrain.loggers.base import BaseLogger, Image, Table, _describe, is_media


def has_wandb_credentials() -> bool:
    """True when an API key is configured (env var or ~/.netrc), without contacting any server."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(requested: str) -> str:
    """The mode mmtrain asks ``wandb.init`` for (as ``mode=``, which wandb ranks above ``WANDB_MODE``).

    An explicit ``wandb.mode`` (online, offline, disabled) wins over ``WANDB_MODE``. Under ``auto``,
    ``WANDB_MODE`` wins when it names a W&B mode (``online``/``run``, ``offline``/``dryrun``,
    ``disabled``); otherwise auto is online with credentials and offline without. Online without
    credentials, whichever way it was asked for, logs offline with a warning: wandb would prompt for
    a login on a terminal, and a job must never wait on one.
    """
    asked = f"wandb.mode={requested}"
    if requested == "auto":
        env = os.environ.get("WANDB_MODE", "").strip()
        env_modes = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                     "disabled": "disabled"}
        if env in env_modes:
            requested, asked = env_modes[env], f"WANDB_MODE={env}"
        else:
            if env:
                warnings.warn(f"W&B: WANDB_MODE={env!r} is not online, offline or disabled; ignoring it "
                              "(wandb.mode=auto).", stacklevel=2)
            return "online" if has_wandb_credentials() else "offline"
    if requested == "online" and not has_wandb_credentials():
        warnings.warn(f"{asked} but no W&B credentials were found (WANDB_API_KEY or `wandb login`); "
                      "logging offline instead. Upload later with `wandb sync`.", stacklevel=2)
        return "offline"
    return requested


def system_metrics(setting: str) -> bool:
    """Whether W&B's own system monitor runs (``wandb.system_metrics``: auto, true, false). auto: only with a
    GPU. On a CPU-only machine its sampler process takes cores from the training step's threads
    (benchmarks/BENCHMARKS.md, "Telemetry overhead"); mmtrain's hw/* metrics cover every rank regardless."""
    if setting != "auto":
        return setting == "true"
    import torch

    return torch.cuda.is_available()


class _NoAnswer(Exception):
    """A W&B call did not return within its time bound."""


def _call_bounded(fn: Callable[[], Any], timeout: float, name: str,
                  on_late: Callable[[Any], None] | None = None) -> Any:
    """``fn()`` in a daemon thread, waiting at most ``timeout`` seconds for it.

    Returns its result or raises its exception; raises :class:`_NoAnswer` when it has not returned
    in time. The thread is a daemon, so a call stuck for good never keeps the process alive. If it
    returns after we gave up, ``on_late(result)`` runs in that thread: the caller's last word on a
    result nobody is waiting for any more (a late ``wandb.init`` must not leave a run attached).
    """
    lock, outcome = threading.Lock(), {}

    def target() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:  # SystemExit included: it must not escape as if it were ours
            result, error = None, e
        with lock:
            outcome.update(result=result, error=error)
            late = outcome.get("abandoned", False)
        if late and error is None and on_late is not None:
            on_late(result)

    thread = threading.Thread(target=target, name=f"mmtrain-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    with lock:  # "too late" is decided under the lock: a result arriving now is either used or given to on_late
        if "error" not in outcome:
            outcome["abandoned"] = True
            raise _NoAnswer(f"no answer after {timeout:g} s")
    error = outcome["error"]
    if error is not None:
        raise error if isinstance(error, Exception) else RuntimeError(_describe(error))
    return outcome["result"]


def _finish_quietly(run: Any) -> None:
    """Close a run we no longer use. Its failure was already reported; this one would say nothing new."""
    if run is not None:
        with contextlib.suppress(Exception):
            run.finish()


class WandbLogger(BaseLogger):
    """A W&B run (online, offline, or none when disabled) in ``output_dir/wandb``.

    Records logged at the same step go to the same W&B history row. The first failing W&B call
    (init, define_metric, log, summary) gives one warning and W&B is off from then on; a failing
    finish gives one warning with the ``wandb sync`` command for the files on disk.

    Public attributes: ``mode`` (the mode W&B really runs in: online, offline, disabled), ``run_dir``
    (the run's folder, None when disabled), ``run_id`` (the run to continue on resume: kept from
    ``load_state_dict`` even when this attempt ends up disabled) and ``url`` (online only).
    """

    name = "wandb"
    takes_media = True
    # Our own bound on wandb.init is init_timeout plus this: wandb's init_timeout covers its talk
    # with the server, not the local start-up before it (spawning wandb-core takes seconds on a busy host).
    init_grace_s = 5.0
    # An online finish uploads what is left. Everything is already on disk in the run folder, so past
    # this we stop waiting (`wandb sync` uploads it later) rather than hang the end of the job.
    finish_timeout_s = 120.0

    def __init__(self, output_dir: Path, cfg: WandbConfig, epoch_metrics: Sequence[str] = ()) -> None:
        self.output_dir = Path(output_dir)
        self.cfg = cfg
        self.epoch_metrics = list(epoch_metrics)
        self.mode = "disabled"  # until open: nothing is started before it
        self.run_dir: Path | None = None
        self.run_id: str | None = None
        self.url: str | None = None
        self._run = None
        self._dropped_run = None  # a run switched off after a failing call; close() finishes it, quietly

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or self.run_id

    def open(self, run_config: dict[str, Any], resume_step: int | None) -> None:
        # resume_step is not used: W&B continues the run by its id (resume="allow") and has no way to
        # drop the rows an interrupted attempt logged after the checkpoint (README: Resuming, W&B).
        self.mode = resolve_mode(self.cfg.mode)
        if self.mode != "disabled":
            self._run = self._init_wandb(run_config)
        if self._run is not None:
            self.run_dir = Path(self._run.dir).parent
            self.run_id = self._run.id
            self.url = getattr(self._run, "url", None) if self.mode == "online" else None
            self._define_epoch_metrics()

    def _init_wandb(self, run_config: dict[str, Any]):  # -> wandb Run | None
        """A W&B run in ``self.mode``, else offline, else ``None`` (disabled); one warning if not as asked.

        Under ``wandb agent`` (WANDB_SWEEP_ID set) the run is the agent's: its id (WANDB_RUN_ID) in the sweep's
        project. No project, entity or id is passed then (wandb 0.31 ignores them in a sweep, with a warning:
        ``clear_run_path_if_sweep_or_launch``), and under ``wandb.mode: auto`` no mode either: wandb decides
        from the agent's environment, as for any program an agent runs."""
        import wandb

        cfg, run_id = self.cfg, self.run_id
        agent = bool(os.environ.get("WANDB_SWEEP_ID"))

        def start(mode: str | None):
            return wandb.init(
                project=None if agent else cfg.project, entity=None if agent else cfg.entity, name=cfg.name,
                group=cfg.group, tags=cfg.tags or None, config=run_config, dir=str(self.output_dir), mode=mode,
                id=None if agent else run_id, resume="allow" if run_id else None,
                settings=wandb.Settings(init_timeout=cfg.init_timeout, silent=True, console="off",
                                        x_disable_stats=not system_metrics(cfg.system_metrics)),
            )

        timeout = cfg.init_timeout + self.init_grace_s
        failures = []
        first = None if agent and cfg.mode == "auto" else self.mode
        for mode in dict.fromkeys([first, "offline"]):
            try:
                # A hang inside wandb.init (DNS, a proxy, a wedged wandb-core) must not stall the job,
                # and wandb's own init_timeout does not cover every wait; so we bound it ourselves.
                # A late return is finished at once: an active run would otherwise be handed back by
                # the next wandb.init in this process (wandb's reinit="return_previous" default).
                run = _call_bounded(lambda mode=mode: start(mode), timeout, "wandb-init", on_late=_finish_quietly)
            except _NoAnswer as e:
                # No second attempt: the stuck init still holds wandb's process-wide state (its
                # singleton setup, the service connection, the active-run slot), and a second
                # wandb.init would wait on the same state or race it. Disabled is the safe answer.
                failures.append(f"{mode or 'the agent mode'}: {e}")
                break
            except Exception as e:  # network, auth, server timeout: offline needs none of them
                failures.append(f"{mode or 'the agent mode'}: {_describe(e)}")
                continue
            if failures:
                warnings.warn(f"W&B init failed ({'; '.join(failures)}); logging {mode} instead. "
                              "Upload later with `wandb sync`.", stacklevel=3)
            if mode is None:  # the agent's choice: read back from the run
                mode = "disabled" if getattr(run, "disabled", False) else \
                    "offline" if getattr(run, "offline", False) else "online"
            self.mode = mode
            return run
        warnings.warn(f"W&B init failed ({'; '.join(failures)}); W&B is disabled for this run, "
                      "metrics.jsonl has every record.", stacklevel=3)
        self.mode = "disabled"
        return None

    def _drop_wandb(self, what: str, error: Exception) -> None:
        """The first failing W&B call switches W&B off for the rest of the run, with one warning: a run
        that failed once is not trusted with more calls, and one line beats one per step."""
        kept = f"; what it logged so far is in {self.run_dir}" if self.run_dir is not None else ""
        warnings.warn(f"W&B {what} failed ({_describe(error)}); W&B is off for the rest of this "
                      f"run{kept}. metrics.jsonl has every record.", stacklevel=3)
        self._dropped_run, self._run = self._run, None
        self.mode, self.run_dir, self.url = "disabled", None, None

    def _define_epoch_metrics(self) -> None:
        """Chart the epoch metrics (globs allowed) against ``epoch`` instead of the optimizer step."""
        try:
            self._run.define_metric("epoch")
            for key in self.epoch_metrics:
                self._run.define_metric(key, step_metric="epoch")
        except Exception as e:
            self._drop_wandb("define_metric", e)

    @staticmethod
    def _to_wandb(record: dict[str, Any], folder: Path | None) -> dict[str, Any]:
        """``record`` with its media as wandb objects. With a ``folder``, each image goes to wandb as
        a PNG file written there from :meth:`Image.png` (the bytes the jsonl sink writes): wandb copies
        the file into the run, where from an array it would encode the image again, at zlib level 6."""
        import wandb

        names = itertools.count()

        def convert(value: Any) -> Any:
            if isinstance(value, Image):
                if folder is None:
                    return wandb.Image(value.array, caption=value.caption)
                path = folder / f"{next(names)}.png"
                path.write_bytes(value.png())
                return wandb.Image(str(path), caption=value.caption)
            if isinstance(value, Table):
                return wandb.Table(columns=value.columns, data=[[convert(c) for c in row] for row in value.rows])
            return value

        return {k: convert(v) for k, v in record.items()}

    def log(self, record: dict[str, Any], step: int) -> None:
        if self._run is None:
            return
        # Not bounded by a thread: run.log only hands the record to wandb's local service process,
        # so it fails fast rather than hangs, and a thread per step would cost more than it guards.
        try:
            # run.log copies media files into the run before it returns, so the PNGs can go with the
            # folder; a run that symlinks media (allow_media_symlink) gets arrays instead.
            if any(is_media(v) for v in record.values()) and not getattr(self._run.settings, "allow_media_symlink",
                                                                         False):
                with tempfile.TemporaryDirectory(prefix="mmtrain-wandb-media-") as folder:
                    self._run.log(self._to_wandb(record, Path(folder)), step=step)
            else:
                self._run.log(self._to_wandb(record, None), step=step)
        except Exception as e:
            self._drop_wandb("log", e)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            try:
                self._run.summary.update(values)
            except Exception as e:
                self._drop_wandb("summary", e)

    def alert(self, title: str, text: str, level: str, wait_seconds: float) -> None:
        """``run.alert``: an email/Slack notification on a W&B server (recorded in an offline run's
        file, sent when it is synced). W&B itself drops an alert whose title was sent less than
        ``wait_duration`` ago: that is the rate limit."""
        if self._run is None:
            return
        import wandb

        try:
            self._run.alert(title=title, text=text, level=getattr(wandb.AlertLevel, level),
                            wait_duration=wait_seconds)
        except Exception as e:
            self._drop_wandb("alert", e)

    def close(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            try:
                _call_bounded(run.finish, self.finish_timeout_s, "wandb-finish")
            except Exception as e:
                where = self.run_dir
                warnings.warn(f"W&B finish failed ({_describe(e)}); the run's files are in {where}, upload them "
                              f"with `wandb sync {shell_word(where)}`. metrics.jsonl has every record.",
                              stacklevel=2)
        # Close a run dropped after a failure (already warned about), so it is complete on disk and no
        # later wandb.init in this process gets it back; bounded too, in case closing it is what hangs.
        dropped, self._dropped_run = self._dropped_run, None
        if dropped is not None:
            with contextlib.suppress(_NoAnswer):
                _call_bounded(lambda: _finish_quietly(dropped), self.finish_timeout_s, "wandb-finish")

    def report_lines(self) -> list[str]:
        run_dir = self.run_dir
        if run_dir is None:
            return [f"{'W&B:':<12}disabled"]
        if self.mode != "offline":
            return [f"{'W&B run:':<12}{self.url or run_dir}"]
        # Each attempt of a resumed run is its own folder (W&B appends -1, -2 to a name taken in the
        # same second); they are uploaded together, in one command (README: W&B offline).
        own = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(str(self.run_id))}(-\d+)?")
        attempts = sorted(p for p in run_dir.parent.iterdir() if own.fullmatch(p.name))
        if len(attempts) > 1:
            return [f"{'W&B run:':<12}{run_dir}  (offline, {len(attempts)} attempts; upload all with one command: "
                    f"wandb sync {' '.join(shell_word(p) for p in attempts)})"]
        return [f"{'W&B run:':<12}{run_dir}  (offline; upload with: wandb sync {shell_word(run_dir)})"]
