"""Run under torchrun by test_distributed.py: the pipeline's training stages on ZeRO-3.

Writes report-rank<R>.json with per-rank parameter shard sizes and, from rank 0, the
embeddings computed inside the training engine, for comparison with the export.
"""
import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore", category=FutureWarning)
from autoregembed.ground import distributed as D  # noqa: E402
from autoregembed.run.config import load_config  # noqa: E402
from autoregembed.run.stages import stages_for  # noqa: E402
from autoregembed.run.session import RunContext  # noqa: E402
from autoregembed.run.trainer import open_trained  # noqa: E402

TEXTS = ["a man is playing the guitar .", "two dogs run in a field", "the stock market fell today ."]


def main():
    out_dir, ds_path, *overrides = sys.argv[1:]
    cfg = load_config(None, overrides)
    ctx, stages = RunContext.of(cfg, ds_path), stages_for(cfg)
    D.init_distributed()
    report = {}

    def inspect(stage):  # the trained engine, as its last checkpoint restores it
        session = open_trained(ctx, stages[stage])
        module = session.engine.module
        params = list(module.parameters())
        batch = session.text_encoder.encode_inputs(TEXTS, [cfg.eval.instruction] * len(TEXTS))
        with torch.no_grad():
            emb = module.embed(**batch)
        report[stage] = {"shard": sum(p.ds_tensor.numel() for p in params),
                         "full": sum(p.ds_numel for p in params),
                         "n_params": len(params), "embeddings": emb.tolist(),
                         "trainable": [n for n, p in module.named_parameters() if p.requires_grad],
                         "decoder_partitioned": [hasattr(p, "ds_id") for p in module.decoder.parameters()],
                         "decoder_in_module": any(n.startswith("decoder.") for n, _ in module.named_parameters())}
        session.close()

    for stage in stages.planned():  # the pipeline's stages, each run as the pipeline runs it
        if stage.name != "eval":
            assert stage.run(ctx, False).status == "done", stage.name
    inspect("stage1")
    inspect("stage2")
    with open(os.path.join(out_dir, f"report-rank{D.rank()}.json"), "w") as f:
        json.dump(report, f)
    D.shutdown()


if __name__ == "__main__":
    main()
