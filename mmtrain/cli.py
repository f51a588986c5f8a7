"""``mmtrain`` command line: argv -> Config -> run. User errors exit 2 with one line, no traceback."""

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmtrain.config import SECTIONS, help_lines, load_config
from mmtrain.errors import TrainingError, UserError

EXAMPLES = """examples:
  mmtrain train --config configs/laptop.yaml
  mmtrain train --config configs/tiny.yaml --train.epochs 3 --optim.lr 5e-4
  mmtrain train --data.source imagefolder --data.path DIR --data.caption_column text
  accelerate launch --multi_gpu --num_processes 2 -m mmtrain train --config configs/tiny.yaml
"""


def _train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", allow_abbrev=False, help="train a model", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the engravings model. Values come from the defaults, then --config, then the "
                    "--section.field options below (later wins).",
        argument_default=argparse.SUPPRESS,
        usage="mmtrain train [-h] [--config FILE.yaml] [--section.field VALUE ...]",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of sections model/data/optim/train/wandb")
    _add_config_options(p)
    return p


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One ``--section.field VALUE`` option per config field, grouped by section. Unset options are
    absent from the parsed namespace (SUPPRESS), so only what the user typed overrides the file."""
    groups = {s: p.add_argument_group(f"{s} options") for s in SECTIONS}
    for flag, type_name, text in help_lines():
        section = flag[2:].split(".", 1)[0]
        groups[section].add_argument(flag, dest=flag[2:], metavar=type_name.replace(" ", "_"), help=text,
                                     default=argparse.SUPPRESS)


def _config_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The ``--section.field`` values given on the command line, as ``{"section.field": text}``."""
    return {k: v for k, v in vars(args).items() if "." in k}


def _device_and_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when present; default)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", allow_abbrev=False, help="caption and reconstruct images with an exported model",
                       description="Greedy caption, reconstruction MSE and reconstruction PNGs for each image.",
                       epilog="example:\n  mmtrain predict runs/laptop/model engravings/ --out predictions/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the model/ folder a training run exported")
    p.add_argument("inputs", metavar="IMAGE_OR_DIR", nargs="+", help="image files and/or folders of images")
    p.add_argument("--out", metavar="DIR", help="write <name>.reconstruction.png, <name>.difference.png, "
                                                "<name>.comparison.png and predictions.jsonl here")
    p.add_argument("--max-length", type=int, default=None, help="longest caption in tokens (default: the model's)")
    _device_and_batch(p)


def _retrieve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrieve", allow_abbrev=False, help="rank images by a caption, or captions by an image",
        description="Rank by cosine similarity in the aligned latent space. Text -> images: --images and "
                    "--query. Image -> text: --image and --captions.",
        epilog="examples:\n  mmtrain retrieve runs/laptop/model --images val/ --query \"two circles above a square\"\n"
               "  mmtrain retrieve runs/laptop/model --image a.png --captions captions.txt --top 3",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the model/ folder a training run exported")
    p.add_argument("--images", metavar="IMAGE_OR_DIR", nargs="+", help="the images to search (text -> images)")
    p.add_argument("--query", metavar="TEXT", action="append", help="a caption to search for (repeatable)")
    p.add_argument("--image", metavar="IMAGE", action="append", help="an image to describe (image -> text; repeatable)")
    p.add_argument("--captions", metavar="FILE", help="candidate captions: .txt one per line, or metadata.jsonl/.csv")
    p.add_argument("--top", type=int, default=5, help="results per query (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object per query instead of a table")
    _device_and_batch(p)


def _export_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-data", allow_abbrev=False, help="write a configured dataset split as an image folder + metadata.jsonl",
        description="Write the images and captions of a data source (by default the built-in synthetic "
                    "engravings) as DIR/<name>.png plus DIR/metadata.jsonl (file_name, caption): the imagefolder "
                    "layout mmtrain trains on, and images to try `mmtrain predict` on.",
        epilog="example:\n  mmtrain export-data --config configs/laptop.yaml --split validation --count 50 "
               "--out val_images/\n\nThe --section.field options are train's: pass the ones you trained with to "
               "export the same data.\nEach image is written as the model's decoder sees it (EXIF orientation "
               "applied, transparency composited,\ngray or RGB per model.image_channels), losslessly: .png, or "
               ".tiff for float images.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="mmtrain export-data [-h] [--config FILE.yaml] [--split {train,validation}] [--count N] --out DIR "
              "[--section.field VALUE ...]")
    p.add_argument("--config", metavar="FILE.yaml", help="the training config whose data and model sections to "
                                                         "read (the model's image_channels and image_background "
                                                         "decide how images are written)")
    p.add_argument("--split", choices=["train", "validation"], default="validation")
    p.add_argument("--count", metavar="N", type=int, default=0, help="first N samples (default 0 = all)")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write (must not exist or be empty)")
    _add_config_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmtrain", description="Train and inspect multimodal engravings models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _predict_parser(sub)
    _retrieve_parser(sub)
    _export_data_parser(sub)
    # The analysis commands own their options (and run without torch until they need it).
    from mmtrain.report import add_report_parser
    from mmtrain.sweep import add_sweep_parser

    add_sweep_parser(sub)
    add_report_parser(sub)
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
        _end_distributed(trainer)
    return 0


def _end_distributed(trainer: Any) -> None:
    """Destroy the process group, and let its C++ object die now, while Python is fully alive.

    ``destroy_process_group`` only unregisters the group: the DDP/FSDP-wrapped model, and the
    Accelerator's list of prepared objects, still reference it, so its gloo worker threads would live
    on into interpreter finalization. A worker that releases a finished collective's Python-created
    tensor there needs the GIL; Python 3.11 ends such a thread with ``pthread_exit``, whose forced
    unwind through C++ aborts the process ("terminate called without an active exception", SIGABRT,
    after a complete run: pytorch/pytorch#179291). Seen in CI as a rank exiting -6; a core dump showed
    ``~AsyncAllreduceWork`` -> ``decref_pyobject`` -> ``take_gil`` -> ``pthread_exit`` on a
    ``ProcessGroupGloo::runLoop`` thread while the main thread was in ``Py_FinalizeEx``.
    """
    import gc

    accelerator = trainer.accelerator
    distributed = accelerator.num_processes > 1
    accelerator.end_training()
    if not distributed:  # no process group: the Trainer stays whole for whoever holds it
        return
    accelerator.free_memory()  # the Accelerator's references to the prepared model, optimizer and loaders
    # And the Trainer's own (model, media, checkpointer, ...): whatever else still holds the Trainer
    # (a test's spy) must not keep the model, and with it the process group, alive.
    vars(trainer).clear()
    gc.collect()


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: not a device mmtrain runs on; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu")
    return name


def _output_folder(value: str, empty: bool = False) -> Path:
    """``--out``, created now (before any model or data work), or a UserError naming it and why."""
    out = Path(value).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder to write into")
    if empty and out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {str(out)!r} already holds files; choose a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise UserError(f"--out {str(out)!r}: cannot create or write this folder ({e.strerror or e}); "
                        "choose another --out") from None
    return out


def _report_failures(failures: list) -> int:
    """One line per input that could not be used; exit 2 (bad input) if there was any, as the README says."""
    for failure in failures:
        print(f"mmtrain: error: {failure.path}: {failure.reason}", file=sys.stderr, flush=True)
    return 2 if failures else 0


def run_predict(args: argparse.Namespace) -> int:
    import json

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length {args.max_length}: must be >= 2 (the [BOS] token and at least one word)")
    _quiet_libraries()
    from mmtrain.inference import find_images, load_pretrained, predict

    out = _output_folder(args.out) if args.out else None
    model, tokenizer = load_pretrained(args.model_dir, _resolve_device(args.device))
    paths, failures = find_images(args.inputs)
    records, bad = predict(model, tokenizer, paths, out, args.batch_size, args.max_length,
                           progress=sys.stderr.isatty())
    for r in records:
        print(f"{r['path']}\t{r['caption']}\tmse={r['reconstruction_mse']:.5f}", flush=True)
    if out is not None:
        (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {len(records)} predictions and their PNGs to {out}", file=sys.stderr)
    return _report_failures(failures + bad)


def run_retrieve(args: argparse.Namespace) -> int:
    import json

    text_to_image = bool(args.images or args.query)
    image_to_text = bool(args.image or args.captions)
    if text_to_image == image_to_text or (text_to_image and not (args.images and args.query)) or \
            (image_to_text and not (args.image and args.captions)):
        raise UserError("give either --images and --query (text -> images) or --image and --captions "
                        "(image -> text)")
    if args.top < 1 or args.batch_size < 1:
        raise UserError("--top and --batch-size must be >= 1")
    if any(not q.strip() for q in args.query or []):
        raise UserError("--query '': a query must hold some text")
    _quiet_libraries()
    from mmtrain.inference import embed_captions, embed_images, find_images, load_pretrained, read_captions, top_k

    model, tokenizer = load_pretrained(args.model_dir, _resolve_device(args.device))
    progress = sys.stderr.isatty()
    if text_to_image:
        paths, failures = find_images(args.images)
        kept, keys, bad = embed_images(model, paths, args.batch_size, progress)
        labels, names = args.query, [str(p) for p in kept]
        hits = top_k(embed_captions(model, tokenizer, labels), keys, args.top) if kept else [[] for _ in labels]
    else:
        captions, failures = read_captions(args.captions)
        paths, missing = find_images(args.image)
        failures += missing
        kept, queries_emb, bad = embed_images(model, paths, args.batch_size, progress)
        labels, names = [str(p) for p in kept], captions
        hits = top_k(queries_emb, embed_captions(model, tokenizer, captions), args.top) if kept else []
    for label, ranked in zip(labels, hits, strict=True):
        results = [{"rank": r + 1, "similarity": round(sim, 4), "match": names[i]}
                   for r, (i, sim) in enumerate(ranked)]
        if args.json:
            print(json.dumps({"query": label, "results": results}), flush=True)
        else:
            print(f"{label}", flush=True)
            for res in results:
                print(f"  {res['rank']:>3}  {res['similarity']:+.4f}  {res['match']}", flush=True)
    return _report_failures(failures + bad)


def run_export_data(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    cfg = load_config(args.config, _config_overrides(args))
    if args.count < 0:
        raise UserError(f"--count {args.count}: must be >= 0")
    out = _output_folder(args.out, empty=True)
    _quiet_libraries()
    from mmtrain.data import load_splits, undecoded
    from mmtrain.images import ImageDecodeError, save_lossless, viewed_image
    from mmtrain.inference import Failure

    # An unreadable image is one sample's problem: skip it (the split is then the one training with
    # data.skip_bad_samples uses) and name it below, instead of refusing the whole export.
    data = dataclasses.replace(cfg.data, skip_bad_samples=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="data.skip_bad_samples")  # reported per sample below
        splits = load_splits(data, cfg.model)
    failures = [Failure(name, f"cannot be read as an image: {reason}; skipped")
                for name, reason in zip(splits.skipped, splits.skipped_reasons, strict=True)]
    ds = undecoded(splits.train if args.split == "train" else splits.val)
    n = min(args.count or len(ds), len(ds))
    lines = []
    for i in range(n):
        row = ds[i]
        image = row["image"]
        try:
            # The image as the model's decoder sees it, saved losslessly: training on this folder, or
            # predicting on these files, gives the tensors training on the source gives.
            viewed = viewed_image(image, cfg.model.image_channels, cfg.model.image_background)
        except ImageDecodeError as e:
            path = image.get("path") if isinstance(image, dict) else None
            failures.append(Failure(path or f"split {args.split} row {i}", f"cannot be read as an image: {e}; skipped"))
            continue
        written = save_lossless(viewed, out / f"{args.split}_{i:05d}")
        lines.append(json.dumps({"file_name": written.name, "caption": row["caption"]}))
    (out / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    print(f"wrote {len(lines)} images and metadata.jsonl to {out}")
    return _report_failures(failures)


def _attach_config_values(argv: Sequence[str]) -> list[str]:
    """``--section.field VALUE`` -> ``--section.field=VALUE``: argparse would read a value starting with
    ``-`` (``-1e3``, ``-foo``) as an option, while the same text in a config file is a value. A
    following token that is itself an option (``--...``) is left alone, so a missing value is still
    reported as missing."""
    flags = {flag for flag, _, _ in help_lines()}
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in flags and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_attach_config_values(sys.argv[1:] if argv is None else list(argv)))
    _short_warnings()
    try:
        handlers = {"train": run_train, "predict": run_predict, "retrieve": run_retrieve,
                    "export-data": run_export_data}
        return handlers[args.command](args) if args.command in handlers else args.handler(args)
    except (UserError, TrainingError) as e:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}mmtrain: error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, UserError) else 1


if __name__ == "__main__":
    sys.exit(main())
