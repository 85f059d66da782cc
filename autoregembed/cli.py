"""Command line: ``autoregembed train | score-refs | export | encode | eval`` and ``train.py``."""
from __future__ import annotations

import argparse
from importlib import resources
import json
import os
import sys

DEFAULT_DS = str(resources.files("autoregembed.ds_configs") / "zero3.json")  # ds_configs/ in the repository


def _add_run_args(p: argparse.ArgumentParser):
    # Our own --deepspeed PATH: deepspeed.add_config_arguments would make it a boolean flag.
    p.add_argument("--deepspeed", default=DEFAULT_DS, metavar="PATH", help="DeepSpeed JSON (default: %(default)s)")
    p.add_argument("--config", default=None, help="YAML run config (default: the built-in tiny CPU pipeline)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set stage1.max_steps=100 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _user_errors() -> tuple:
    """Errors in what the user gave us (config, data, files, folders): one line, exit status 2.
    Anything else is a bug and keeps its traceback."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .refscores import ReferenceScoreError
    from .runlock import RunLockError

    return ConfigError, DataError, ReferenceScoreError, CheckpointError, RunLockError


def _fail(e: Exception) -> int:
    if os.environ.get("RANK", "0") == "0":  # every rank hits the same error: say it once
        print(f"autoregembed: error: {e}", file=sys.stderr, flush=True)
    return 2


def run_training(args, stage: str | None = None) -> int:
    from . import distributed as D, warnings_once
    from .config import load_config
    from .trainer import run

    warnings_once.install()
    overrides = list(args.overrides) + ([f"stage={stage}"] if stage else [])
    try:
        cfg = load_config(args.config, overrides)  # config errors surface before any process group or model
        D.select_device(cfg.device)
        D.init_distributed()
        try:
            run(cfg, args.deepspeed, resume=args.resume)
        finally:
            D.shutdown()
    except _user_errors() as e:
        return _fail(e)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="autoregembed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "run the configured stage (default: the whole pipeline)"),
                        ("score-refs", "compute stage-2 reference scores with the stage-1 model"),
                        ("export", "consolidate a stage's latest checkpoint into a Hugging Face folder")):
        _add_run_args(sub.add_parser(name, help=help_))
    enc = sub.add_parser("encode", help="embed lines of text with an exported model")
    enc.add_argument("--model", required=True)
    enc.add_argument("--input", required=True, help="text file, one text per line")
    enc.add_argument("--output", required=True, help=".npy file to write")
    enc.add_argument("--instruction", default=None)
    enc.add_argument("--batch-size", type=int, default=32)
    ev = sub.add_parser("eval", help="STS Spearman x100 of an exported model")
    ev.add_argument("--model", required=True)
    ev.add_argument("--sts", required=True, help="STS-B format file (tab-separated)")
    ev.add_argument("--batch-size", type=int, default=64)
    pl = sub.add_parser("plan", help="per-GPU memory of a run; refuses plans that do not fit")
    pl.add_argument("--model", required=True, help="preset (llama-2-7b, ...) or a config.json / model folder")
    pl.add_argument("--gpus-per-node", type=int, default=8)
    pl.add_argument("--nodes", type=int, default=1)
    pl.add_argument("--zero", type=int, default=3)
    pl.add_argument("--micro-batch", type=int, default=4)
    pl.add_argument("--negatives", type=int, default=1)
    pl.add_argument("--max-len", type=int, default=512)
    pl.add_argument("--num-embed-tokens", type=int, default=5)
    pl.add_argument("--gpu-mem-gb", type=float, default=80)
    args = parser.parse_args(argv)

    if args.command == "plan":
        from .plan import Arch, plan, report

        for name in ("gpus_per_node", "nodes", "micro_batch", "max_len", "num_embed_tokens"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.negatives < 0 or args.gpu_mem_gb <= 0:
            parser.error("--negatives must be >= 0 and --gpu-mem-gb > 0")
        arch, gpus = Arch.load(args.model), args.gpus_per_node * args.nodes
        shape = (args.micro_batch, args.negatives, args.max_len, args.num_embed_tokens)
        p = plan(arch, gpus, args.zero, *shape)
        text, fits = report(p, args.gpu_mem_gb, plan(arch, gpus, 2, *shape) if args.zero == 3 else None)
        print(text)
        return 0 if fits else 3

    if args.command in ("train", "score-refs", "export"):
        stage = {"train": None, "score-refs": "reference", "export": "export"}[args.command]
        return run_training(args, stage)
    try:
        return _encode_or_eval(args)
    except (ValueError, TypeError, OSError) as e:  # a bad file, folder or value given on the command line
        return _fail(e)


def _encode_or_eval(args) -> int:
    from .encoder import Encoder

    model = Encoder.from_pretrained(args.model)
    if args.command == "encode":
        import numpy as np

        from .atomic import atomic_file
        from .data import read_lines

        texts = read_lines(args.input)  # blank lines too: output row i is input line i
        emb = model.encode(texts, batch_size=args.batch_size, instruction=args.instruction, show_progress_bar=True)
        with atomic_file(args.output) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, emb)
        print(json.dumps({"output": args.output, "shape": list(emb.shape)}))
        return 0
    from .evaluate import sts_eval

    r = sts_eval(model, args.sts, args.batch_size)
    print(json.dumps({"model": args.model, "sts": args.sts, "spearman_x100": round(r["spearman"], 2),
                      "mean_pairwise_cosine": round(r["mean_cosine"], 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
