"""STS of an export's compressed tokens under other poolings than the method's mean of e_1..e_k.

One encode keeps all k states; the script scores each e_i alone, the mean of the normalised e_i, and
the mean centred on a fixed vector: the mean embedding of training texts (``--centre-on``, deployable:
fixed before any evaluation text is seen) and, as a bound, of the evaluation texts themselves.  For
each it prints Spearman x100 and the mean pairwise cosine of the embeddings (how much of the embedding
every text shares; the figure ``autoregembed eval`` and bench/quality.py print).  Why: mean pooling can be dominated by what every text shares; this
tells how much STS that costs an export.

    python bench/pooling.py --model EXPORT --sts sts-dev-tune.csv --centre-on stage1.jsonl
    python bench/pooling.py --model EXPORT --sts sts-dev-tune.csv --subsets   # every subset of positions
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

import harness  # noqa: F401  (puts the checkout on sys.path)
import autoregembed.release.encoder as encoder_module
from autoregembed.release.encoder import Encoder
from autoregembed.release.evaluate import mean_pairwise_cosine, read_sts


def states(enc: Encoder, texts: list[str]) -> torch.Tensor:
    """[texts, k, D] compressed-token states (float64), through the Encoder's own input path."""
    pool = encoder_module.pool_embedding
    encoder_module.pool_embedding = lambda e, positions=None: e.reshape(e.shape[0], -1)
    try:
        flat = enc.encode(texts, convert_to_numpy=False)
    finally:
        encoder_module.pool_embedding = pool
    return flat.reshape(len(texts), enc.k, -1).double()


def score(a: torch.Tensor, b: torch.Tensor, gold) -> dict:
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return {"spearman_x100": round(100 * spearmanr((a * b).sum(-1).numpy(), gold).correlation, 2),
            "mean_pairwise_cosine": round(mean_pairwise_cosine(torch.cat([a, b]).numpy()), 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--sts", required=True, help="STS-B csv (bench/quality.py writes its halves into --out)")
    ap.add_argument("--centre-on", help="jsonl rows with 'context': the training texts whose mean is subtracted")
    ap.add_argument("--rows", type=int, default=512, help="how many of --centre-on")
    ap.add_argument("--subsets", action="store_true",
                    help="also every subset of the positions, mean-pooled ('1234': e_1..e_4; what eval.pooling chose from)")
    args = ap.parse_args()
    enc = Encoder.from_pretrained(args.model)
    a_txt, b_txt, gold = read_sts(args.sts)
    a, b = states(enc, a_txt), states(enc, b_txt)
    out = {"mean of e_1..e_k (the method's embedding)": score(a.mean(1), b.mean(1), gold)}
    out.update({f"e_{i + 1} alone": score(a[:, i], b[:, i], gold) for i in range(enc.k)})
    out["mean of the normalised e_i"] = score(F.normalize(a, dim=-1).mean(1), F.normalize(b, dim=-1).mean(1), gold)
    if args.centre_on:
        with open(args.centre_on) as f:
            texts = [json.loads(line)["context"] for line in f][: args.rows]
        mu = states(enc, texts).mean(1).mean(0)
        out[f"mean, centred on {len(texts)} training texts"] = score(a.mean(1) - mu, b.mean(1) - mu, gold)
    mu = torch.cat([a.mean(1), b.mean(1)]).mean(0)
    out["mean, centred on the evaluation texts (a bound)"] = score(a.mean(1) - mu, b.mean(1) - mu, gold)
    if args.subsets:
        out["subsets (Spearman x100)"] = {
            "".join(str(i + 1) for i in sub): score(a[:, list(sub)].mean(1), b[:, list(sub)].mean(1), gold)["spearman_x100"]
            for r in range(1, enc.k + 1) for sub in itertools.combinations(range(enc.k), r)}
    out["norm of e_i (mean)"] = [round(float(x), 2) for x in torch.cat([a, b]).norm(dim=-1).mean(0)]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
