"""Command line: ``autoregembed train | score-refs | export | stages | encode | eval | reconstruct | push | plan |
plot | data | mine`` and ``train.py``."""
from __future__ import annotations

import argparse
from importlib import resources
import json
import os
import sys

from ..ground.errors import reporting_user_errors

DEFAULT_DS = str(resources.files("autoregembed.ds_configs") / "zero3.json")  # ds_configs/ in the repository


def _add_run_args(p: argparse.ArgumentParser):
    # Our own --deepspeed PATH: deepspeed.add_config_arguments would make it a boolean flag.
    p.add_argument("--deepspeed", default=DEFAULT_DS, metavar="PATH", help="DeepSpeed JSON (default: %(default)s)")
    p.add_argument("--config", default=None, help="YAML run config (default: the built-in tiny CPU pipeline)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set stage1.max_steps=100 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run_training(args, stage: str | None = None) -> int:
    from ..ground import distributed as D
    from ..ground import warnings_once
    from ..run.config import load_config
    from ..run.pipeline import run
    from ..run.preemption import EXIT_STOPPED
    from ..ground.quiet import quiet_libraries

    warnings_once.install()
    quiet_libraries()
    overrides = list(args.overrides) + ([f"stage={stage}"] if stage else [])

    def train() -> int:
        cfg = load_config(args.config, overrides)  # config errors surface before any process group or model
        D.select_device(cfg.device)
        D.init_distributed()
        try:
            _, status = run(cfg, args.deepspeed, resume=args.resume)
        finally:
            D.shutdown()
        return 0 if status == "done" else EXIT_STOPPED  # stopped with its state saved: --resume continues

    try:
        return reporting_user_errors(train)
    except KeyboardInterrupt:  # a second Ctrl-C (preemption.py): no traceback, and nothing saved since the last save
        if os.environ.get("RANK", "0") == "0":
            print("autoregembed: interrupted by a second Ctrl-C: quit without saving (--resume continues from "
                  "the last checkpoint)", file=sys.stderr, flush=True)
        return 130


def main(argv=None) -> int:
    from ..method.scorers import SCORERS  # no torch at import: the command line starts fast
    from .convert import CONVERTERS

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
    pooling_help = "an eval.pooling value in place of the export's own (all, all_but_last, or positions 1,2,3)"
    enc.add_argument("--pooling", default=None, help=pooling_help)
    ev = sub.add_parser("eval", help="STS Spearman x100 of an exported model, its retrieval, or MTEB tasks")
    ev.add_argument("--model", required=True)
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--sts", help="STS-B format file (tab-separated)")
    what.add_argument("--mteb", metavar="TASKS", help="comma-separated MTEB task names, e.g. STS12,STS13,STSBenchmark")
    what.add_argument("--retrieval", metavar="PATH", help="a BEIR folder, or a JSONL of {query, pos, neg} rows: "
                      "nDCG@10, MRR@10, recall@100 (queries and documents through the export's own instructions)")
    ev.add_argument("--output", default="mteb-results", help="--mteb: folder for mteb's result files (default: %(default)s)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--pooling", default=None, help=pooling_help + " (with --sts or --retrieval)")
    ev.add_argument("--base", default=None, help="with --sts or --retrieval: also score this untrained base model read the same "
                    "way (the floor the export must beat; a folder or hub name)")
    pu = sub.add_parser("push", help="an export to a Hugging Face Hub model repository (one commit, a card for the repo)")
    pu.add_argument("--model", required=True, help="the export folder")
    pu.add_argument("--repo", required=True, help="owner/name; created if it does not exist")
    pu.add_argument("--private", action="store_true")
    pu.add_argument("--revision", default=None, help="branch (default: main)")
    pu.add_argument("--token", default=None, help="default: HF_TOKEN or the cached login")
    pu.add_argument("--adapter", action="store_true",
                    help="push the LoRA adapters exported beside --model (its sibling folder 'adapter') instead")
    pu.add_argument("--base-repo", default=None,
                    help="for adapters: the repository of the export they sit on (push that export first)")
    sg = sub.add_parser("stages", help="the stages `stage: pipeline` runs with a config, in order, one per line")
    _add_run_args(sg)  # the arguments of train.py (slurm/pipeline.sh passes a job's EXTRA_ARGS); --set, --config count
    sg.add_argument("--all", action="store_true", help="every stage (each a value of `stage`), with what it does")
    pt = sub.add_parser("plot", help="PNG of loss, learning rate and gradient norm per stage of a run")
    pt.add_argument("run_dir", help="a run's output_dir")
    pt.add_argument("--output", default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    data = sub.add_parser("data", help="check a training file, or convert a public layout into ours")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    ck = data_sub.add_parser("check", help="rows, errors (file:line), duplicates, negatives, token lengths")
    ck.add_argument("file", nargs="*", help="files, folders or hub datasets (default: the config's data.stage1 / "
                    "data.stage2 sources, with their column mappings and instructions)")
    ck.add_argument("--stage", type=int, choices=(1, 2), required=True)
    ck.add_argument("--tokenizer", default=None,
                    help="tokenizer folder or hub name (default: the config's base model, if it is on disk)")
    ck.add_argument("--config", default=None, help="YAML run config: data.max_text_len / max_target_len")
    ck.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ck.add_argument("--json", action="store_true", help="print the report as JSON")
    cv = data_sub.add_parser("convert", help="SimCSE CSV, FlagEmbedding or authors' jsonl, plain text -> our rows")
    cv.add_argument("--from", dest="kind", required=True, choices=sorted(CONVERTERS))
    cv.add_argument("src")
    cv.add_argument("out")
    cv.add_argument("--instruction", default=None, help="for rows that carry none")
    mn = sub.add_parser("mine", help="hard negatives from a model's own embeddings, as stage-2 rows")
    mn.add_argument("--model", required=True, help="an exported model")
    mn.add_argument("--queries", required=True, help="jsonl rows with query, pos, instruction")
    mn.add_argument("--corpus", default=None,
                    help="passages: .jsonl of {text} or plain lines (default: every pos and neg of --queries)")
    mn.add_argument("--negatives", type=int, default=7)
    mn.add_argument("--skip-top", type=int, default=0, help="ranks to skip before taking negatives")
    mn.add_argument("--max-similarity", type=float, default=0.95,
                    help="skip passages at least this close (cosine) to the positive")
    mn.add_argument("--range-max", type=int, default=0,
                    help="only ranks below this are candidates (FlagEmbedding's range_for_sampling); 0: no limit")
    mn.add_argument("--absolute-margin", type=float, default=None,
                    help="skip passages whose cosine to the query is above cos(query, pos) minus this")
    mn.add_argument("--relative-margin", type=float, default=None,
                    help="skip passages whose cosine to the query is above cos(query, pos) x (1 - this)")
    mn.add_argument("--sampling", default="top", help="top: the most similar allowed passages; random: drawn "
                    "among them (seeded by --seed)")
    mn.add_argument("--seed", type=int, default=42)
    mn.add_argument("--index", default="exact", help="exact: every passage scored; faiss: an inverted-file index "
                    "for corpora too large for that (pip install faiss-cpu, or a GPU build)")
    mn.add_argument("--index-lists", type=int, default=0, help="faiss: clusters (0: 4 x sqrt(passages))")
    mn.add_argument("--index-probe", type=int, default=32, help="faiss: clusters read per query")
    mn.add_argument("--output", required=True, help="stage-2 jsonl to write")
    mn.add_argument("--batch-size", type=int, default=64)
    rc = sub.add_parser("reconstruct", help="regenerate texts from their compressed tokens with the frozen decoder")
    rc.add_argument("--model", required=True, help="an export folder")
    rc.add_argument("--decoder", default=None, help="the frozen base causal LM (default: the export's base model)")
    rc_in = rc.add_mutually_exclusive_group(required=True)
    rc_in.add_argument("--input", help="a text file, one text per line")
    rc_in.add_argument("--text", action="append", help="a text (repeatable)")
    rc.add_argument("--limit", type=int, default=None, help="the first N texts of --input")
    rc.add_argument("--instruction", default=None, help="default: the export's")
    rc.add_argument("--max-new-tokens", type=int, default=64)
    rc.add_argument("--output", default=None, help="also write one JSON line per text here")
    pl = sub.add_parser("plan", help="per-GPU memory of a run; refuses plans that do not fit")
    pl.add_argument("--model", required=True, help="preset (llama-2-7b, ...) or a config.json / model folder")
    pl.add_argument("--gpus-per-node", type=int, default=8)
    pl.add_argument("--nodes", type=int, default=1)
    pl.add_argument("--zero", type=int, default=3)
    pl.add_argument("--micro-batch", type=int, default=4)
    pl.add_argument("--stage", type=int, choices=(1, 2), default=2, help="the stage whose step is planned")
    pl.add_argument("--negatives", type=int, default=1, help="hard negatives per query (stage 2)")
    pl.add_argument("--max-len", type=int, default=512, help="tokens per text (stage 1: per context and per target)")
    pl.add_argument("--shared-prefix", type=int, default=5,
                    help="model.shared_prefix: positions before e in every decoder sequence (0: the published input)")
    pl.add_argument("--no-contrast", action="store_true",
                    help="stage 1 without stage1_loss.contrast's second decoder pass (stage1_loss.contrast=0)")
    pl.add_argument("--num-embed-tokens", type=int, default=5)
    pl.add_argument("--gpu-mem-gb", type=float, default=80)
    pl.add_argument("--no-decoder-checkpointing", action="store_true",
                    help="the decoder keeps its activations (model.decoder_checkpointing=false)")
    pl.add_argument("--decoder-checkpointing", type=int, default=None, metavar="N",
                    help="the decoder recomputes its first N layers and keeps the others' activations "
                         "(model.decoder_checkpointing=N); default: every layer")
    pl.add_argument("--hpz", action="store_true",
                    help="ds_configs/zero3_multinode.json: a second copy of the parameters partitioned within each node")
    pl.add_argument("--shard-decoder", action="store_true",
                    help="the frozen decoder partitioned under ZeRO-3 (model.shard_decoder); default: whole per GPU")
    pl.add_argument("--scorer", default="fused", choices=list(SCORERS), help="the LM head's scorer backend (scorer.kind)")
    pl.add_argument("--embeddings-only", action="store_true",
                    help="stage 2 with an objective on embeddings alone (loss.kind=infonce): no decoder loaded")
    args = parser.parse_args(argv)

    if args.command == "plan":
        for name in ("gpus_per_node", "nodes", "micro_batch", "max_len", "num_embed_tokens"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.negatives < 0 or args.shared_prefix < 0 or args.gpu_mem_gb <= 0:
            parser.error("--negatives and --shared-prefix must be >= 0 and --gpu-mem-gb > 0")
        return reporting_user_errors(lambda: _plan(args))
    if args.command in ("train", "score-refs", "export"):
        stage = {"train": None, "score-refs": "reference", "export": "export"}[args.command]
        return run_training(args, stage)
    from ..ground import warnings_once

    warnings_once.install()
    if args.command in ("encode", "eval", "mine", "reconstruct"):  # the others load no model: they start fast
        from ..ground.quiet import quiet_libraries

        quiet_libraries()
    tools = {"stages": _stages, "plot": _plot, "data": _data, "mine": _mine, "encode": _encode_or_eval,
             "eval": _encode_or_eval, "reconstruct": _reconstruct, "push": _push}
    return reporting_user_errors(lambda: tools[args.command](args))


def _plan(args) -> int:
    from ..ground.arch import Arch
    from .plan import fewest_recomputed, plan, report

    arch, gpus = Arch.load(args.model), args.gpus_per_node * args.nodes
    shape = (args.micro_batch, args.negatives, args.max_len, args.num_embed_tokens)
    recompute = (False if args.no_decoder_checkpointing else
                 True if args.decoder_checkpointing is None else args.decoder_checkpointing)
    common = {"decoder_checkpointing": recompute, "scorer": args.scorer, "stage": args.stage,
              "contrast": not args.no_contrast, "hpz": args.gpus_per_node if args.hpz else 0,
              "reads_decoder": not args.embeddings_only}
    prefix = 0 if args.shard_decoder else args.shared_prefix  # a partitioned decoder reads no shared prefix
    p = plan(arch, gpus, args.zero, *shape, shard_decoder=args.shard_decoder, prefix=prefix, **common)
    text, fits = report(p, args.gpu_mem_gb,
                        plan(arch, gpus, 2, *shape, prefix=prefix, **common) if args.zero == 3 else None,
                        plan(arch, gpus, 3, *shape, shard_decoder=True, **common) if args.zero == 3 else None)
    print(text)
    fewest = fewest_recomputed(arch, args.gpu_mem_gb, gpus, args.zero, *shape, shard_decoder=args.shard_decoder,
                               prefix=prefix, **common)
    if fits and fewest is not None and fewest < p["recomputed_layers"]:
        print(f"decoder checkpointing: recomputing {fewest} of {arch.layers} decoder layers fits too "
              f"(--set model.decoder_checkpointing={fewest}); each layer not recomputed saves its forward's "
              f"recompute, a third of the layer's FLOPs in a step")
    return 0 if fits else 3


def _push(args) -> int:
    from ..ground.errors import InputError
    from ..release.push import push

    folder = os.path.join(os.path.dirname(os.path.abspath(args.model)), "adapter") if args.adapter else args.model
    if args.adapter and not os.path.isdir(folder):
        raise InputError(f"--adapter: no adapter export beside {args.model} ({folder}); a stage writes one when it "
                         f"trains through LoRA from an export (model.lora_stages)")
    url = push(folder, args.repo, private=args.private, revision=args.revision, token=args.token,
               base_repo=args.base_repo)
    print(json.dumps({"model": folder, "repo": args.repo, "commit": url}))
    return 0


def _stages(args) -> int:
    from ..run.config import load_config
    from ..run.stages import PIPELINE, stages_for

    if args.all:
        for s in PIPELINE:
            print(f"{s.name:<10} {(s.__doc__ or '').split(chr(10))[0]}")
        return 0
    cfg = load_config(args.config, list(args.overrides) + ["stage=pipeline"])
    for s in stages_for(cfg).planned():
        print(s.name)
    return 0


def _plot(args) -> int:
    from ..release.plot import plot_run
    from ..run.stages import TRAINING

    print(json.dumps({"plot": plot_run(args.run_dir, TRAINING, args.output)}))
    return 0


def _data(args) -> int:
    if args.data_command == "convert":
        from .convert import convert

        n, stage = convert(args.kind, args.src, args.out, args.instruction)
        print(json.dumps({"output": args.out, "rows": n, "stage": stage}))
        return 0
    from ..run.config import load_config
    from .data_check import check_file

    cfg = load_config(args.config, args.overrides)
    tokenizer, source = None, args.tokenizer or cfg.layout.base_model
    if args.tokenizer or os.path.isdir(source):
        from ..run.loading import load_tokenizer

        tokenizer = load_tokenizer(source, cfg.model.num_embed_tokens)  # as the run will tokenize
    reports = [check_file(f, args.stage, tokenizer, cfg.data.max_text_len, cfg.data.max_target_len)
               for f in args.file or cfg.sources(args.stage)]  # default: the run's sources, mapped as it reads them
    mixture = None
    if not args.file and not any(r.errors for r in reports):  # the run's own sources: the shares its steps read
        from ..run.stages import stages_for

        st = stages_for(cfg)[f"stage{args.stage}"]
        mixture = st.mixture(st.rows())
    if args.json:
        out = reports[0].as_dict() if len(reports) == 1 else {"sources": [r.as_dict() for r in reports]}
        print(json.dumps({**out, **({"mixture": mixture} if mixture else {})}))
    else:
        print("\n".join(r.text() for r in reports))
        if mixture:
            print(f"mixture over stage{args.stage}'s {st.settings().max_steps} steps at 1 rank: {mixture}")
        if tokenizer is None:
            print(f"  (token lengths skipped: no tokenizer at {source}; pass --tokenizer)")
    return 1 if any(r.errors for r in reports) else 0


def _mine(args) -> int:
    from ..ground.data import write_jsonl
    from ..release.encoder import Encoder
    from ..release.mining import default_corpus, mine_negatives, read_corpus, read_queries

    from ..release.mining import check_mining
    from ..ground.errors import InputError

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    settings = dict(range_max=args.range_max, absolute_margin=args.absolute_margin,
                    relative_margin=args.relative_margin, sampling=args.sampling, index=args.index,
                    index_lists=args.index_lists, index_probe=args.index_probe)
    check_mining(args.negatives, args.skip_top, args.max_similarity, **settings,
                 name=lambda key: "--" + key.replace("_", "-"))
    rows = read_queries(args.queries, with_negatives=args.corpus is None)  # bad input fails before the model loads
    corpus = read_corpus(args.corpus) if args.corpus else default_corpus(rows)
    mined = mine_negatives(Encoder.from_pretrained(args.model), rows, corpus, args.negatives, args.skip_top,
                           args.max_similarity, args.batch_size, show_progress_bar=True, seed=args.seed, **settings)
    write_jsonl(args.output, mined)
    print(json.dumps({"output": args.output, "rows": len(mined), "skipped_rows": len(rows) - len(mined),
                      "corpus": len(corpus)}))
    return 0


def _reconstruct(args) -> int:
    from ..ground.data import read_lines, write_jsonl
    from ..ground.errors import InputError
    from ..release.reconstruct import ExportReconstructor, summary

    if args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise InputError("--max-new-tokens and --limit must be >= 1")
    texts = args.text or [t for t in read_lines(args.input) if t.strip()][: args.limit]
    if not texts:
        raise InputError(f"{args.input}: no texts")
    export = ExportReconstructor(args.model, args.decoder)
    results = export(texts, args.instruction, args.max_new_tokens)
    for r in results:
        print(f"original:    {r['text']}\nregenerated: {r['regenerated']}\ntoken accuracy {r['token_accuracy']:.3f}, "
              f"information gap {r['gap']:.2f} nats{' (cut to what the encoder reads)' if r['cut'] else ''}\n")
    if args.output:
        write_jsonl(args.output, results)
    print(json.dumps({"model": args.model, "decoder": export.decoder_path, **summary(results)}))
    return 0


def _encode_or_eval(args) -> int:
    from ..release.encoder import Encoder

    if args.command == "eval" and args.mteb:
        from ..release.mteb_model import run_mteb
        from ..ground.errors import InputError

        if args.pooling is not None or args.base is not None:
            raise InputError("--pooling and --base apply to --sts and --retrieval; MTEB reads the export's own pooling")

        scores = run_mteb(args.model, [t.strip() for t in args.mteb.split(",") if t.strip()], args.output,
                          args.batch_size)
        print(json.dumps({"model": args.model, "results": args.output, "main_score_x100": scores}))
        return 0
    if getattr(args, "base", None):
        from ..run.config import looks_local
        from ..ground.errors import InputError

        if looks_local(args.base) and not os.path.isdir(os.path.expanduser(args.base)):
            raise InputError(f"--base {args.base}: no such model folder")
    if args.command == "encode":
        from ..ground.data import read_lines

        texts = read_lines(args.input)  # blank lines too: output row i is input line i; read before the model loads
    elif args.retrieval:
        from ..release.retrieval import load

        load(args.retrieval)  # a bad line fails before the model loads
    else:
        from ..release.evaluate import read_sts

        read_sts(args.sts)  # a bad line fails before the model loads
    model = Encoder.from_pretrained(args.model, pooling=args.pooling)
    if args.command == "encode":
        import numpy as np

        from ..ground.atomic import atomic_file

        emb = model.encode(texts, batch_size=args.batch_size, instruction=args.instruction, show_progress_bar=True)
        with atomic_file(args.output) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, emb)
        print(json.dumps({"output": args.output, "shape": list(emb.shape)}))
        return 0
    from ..release.evaluate import base_report, retrieval_report, sts_report
    from ..release.paired import keep

    items = {"model": {}, "base": {}}  # per-item scores: the paired intervals of model minus base
    result = ({"model": args.model, "retrieval": retrieval_report(model, args.retrieval, args.batch_size, True,
                                                                  items["model"])}
              if args.retrieval else sts_report(model, args.model, args.sts, args.batch_size, items=items["model"]))
    result.update({"pooling": args.pooling} if args.pooling else {})
    del model  # the base loads after it, not beside it
    if args.base:
        result.update(base_report(args.base, args.model, args.sts, args.batch_size, args.pooling,
                                  retrieval=args.retrieval, items=items["base"]))
        keep(result, "base_", items["model"], items["base"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
