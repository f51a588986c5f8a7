"""Every command mmtrain prints works when pasted into a shell, whatever the paths hold."""

import re
import shlex
import signal
from pathlib import Path

from conftest import TINY, reset_accelerate

from mmtrain.cli import main
from mmtrain.trainer import Trainer

ODD = "My Drive/tiny run (it's $HOME)"


def _pasted(text: str, pattern: str) -> list[str]:
    """The shell words of the command that ``pattern`` (one group: the rest of the line) finds."""
    found = re.search(pattern, text, re.MULTILINE)
    assert found, text
    return shlex.split(found.group(1))


def test_the_final_report_quotes_the_wandb_sync_command(tmp_path, capsys):
    out = tmp_path / ODD
    assert main(["train", "--config", str(TINY), "--train.output_dir", str(out), "--train.max_steps", "2",
                 "--wandb.mode", "offline", "--wandb.media_samples", "0"]) == 0
    words = _pasted(capsys.readouterr().out, r"upload with: (wandb sync .*)\)$")
    assert words[:2] == ["wandb", "sync"] and len(words) == 3
    assert Path(words[2]).is_dir() and Path(words[2]).parent == out / "wandb"


def test_the_preemption_hint_and_the_different_run_message_quote_paths(tmp_path, capsys, monkeypatch):
    out = tmp_path / ODD
    step_end = Trainer.log_and_save_at_step_end

    def signalled(self, lrs, epoch_ends):
        if self.state.optimizer_step == 2:
            self.signals.received = signal.SIGTERM
        return step_end(self, lrs, epoch_ends)

    monkeypatch.setattr(Trainer, "log_and_save_at_step_end", signalled)
    args = ["train", "--config", str(TINY), "--train.output_dir", str(out), "--wandb.mode", "disabled"]
    assert main(args) == 0
    words = _pasted(capsys.readouterr().out, r"\(or (--train\.resume .*)\)")
    assert len(words) == 2 and (Path(words[1]) / "train_state.json").is_file()
    monkeypatch.undo()
    reset_accelerate()
    assert main([*args, "--model.latent_dim", "16", "--train.resume", "auto"]) == 2
    words = _pasted(capsys.readouterr().err, r"checkpoint's config \((--config .*?)\), or start")
    assert len(words) == 2 and Path(words[1]).is_file()


def test_a_path_starting_with_a_dash_is_never_read_as_an_option(tmp_path, capsys, monkeypatch):
    from mmtrain.errors import shell_word

    assert shell_word("-lead/x y") == "'./-lead/x y'" and shell_word("/abs/-x") == "/abs/-x"
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(TINY), "--train.output_dir", "-lead", "--train.max_steps", "2",
                 "--wandb.mode", "offline", "--wandb.media_samples", "0"]) == 0
    words = _pasted(capsys.readouterr().out, r"upload with: (wandb sync .*)\)$")
    assert words[2].startswith("./-lead/wandb/") and Path(words[2]).is_dir()


def test_a_resumed_offline_run_prints_one_sync_command_for_all_its_attempts(tmp_path, capsys):
    """README (W&B offline): upload all of a run's folders in one command; syncing only the last
    attempt would leave the first out (and uploading it later replaces the history)."""
    out = tmp_path / ODD
    args = ["train", "--config", str(TINY), "--train.output_dir", str(out), "--wandb.mode", "offline",
            "--wandb.media_samples", "0", "--checkpoint.every_steps", "2"]
    assert main([*args, "--train.max_steps", "2"]) == 0
    reset_accelerate()
    capsys.readouterr()
    assert main([*args, "--train.resume", "auto"]) == 0
    printed = capsys.readouterr().out
    line = re.search(r"upload all with one command: (wandb sync .*)\)$", printed, re.MULTILINE)
    assert line, printed + str(sorted(p.name for p in (out / "wandb").iterdir()))
    folders = [Path(p) for p in shlex.split(line.group(1))[2:]]
    assert len(folders) == 2 and all(f.is_dir() and f.parent == out / "wandb" for f in folders)
