"""``mmtrain`` command line: argv -> Config -> run. User errors exit 2 with one line, no traceback."""

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from mmtrain.config import SECTIONS, help_lines, load_config
from mmtrain.errors import UserError

EXAMPLES = """examples:
  mmtrain train --config configs/laptop.yaml
  mmtrain train --config configs/tiny.yaml --train.epochs 3 --optim.lr 5e-4
  mmtrain train --data.source imagefolder --data.path DIR --data.caption_column text
  accelerate launch --multi_gpu --num_processes 2 -m mmtrain train --config configs/tiny.yaml
"""


def _train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train a model", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the engravings model. Values come from the defaults, then --config, then the "
                    "--section.field options below (later wins).",
        argument_default=argparse.SUPPRESS,
        usage="mmtrain train [-h] [--config FILE.yaml] [--section.field VALUE ...]",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of sections model/data/optim/train/wandb")
    groups = {s: p.add_argument_group(f"{s} options") for s in SECTIONS}
    for flag, type_name, text in help_lines():
        section = flag[2:].split(".", 1)[0]
        groups[section].add_argument(flag, dest=flag[2:], metavar=type_name.replace(" ", "_"), help=text)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmtrain", description="Train and inspect multimodal engravings models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    return parser


def _short_warnings() -> None:
    """Our warnings are addressed to users: one line, no source location."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"mmtrain: warning: {message}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer is used
    import datasets
    import transformers
    from huggingface_hub.utils import logging as hub_logging

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    hub_logging.set_verbosity_error()


def run_train(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    cfg = load_config(getattr(args, "config", None), overrides)  # validated before any heavy work
    _quiet_libraries()
    from mmtrain.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.accelerator.end_training()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _short_warnings()
    try:
        return {"train": run_train}[args.command](args)
    except UserError as e:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}mmtrain: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
