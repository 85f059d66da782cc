"""Regenerate the small derived fixtures in autoregembed/resources/ from ../shared/data.

Run once by a developer; the outputs are committed so the built-in default runs anywhere.
"""
import csv
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")
OUT = os.path.join(ROOT, "autoregembed", "resources")
AUTOENCODE = "Reconstruct the original text."


def sts_rows(name):
    with open(os.path.join(SHARED, "stsb", name), encoding="utf-8") as f:
        return [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) >= 7]


def main():
    rng = random.Random(0)
    nli = [json.loads(line) for line in open(os.path.join(SHARED, "nli", "medi_nli.jsonl"), encoding="utf-8")]
    rng.shuffle(nli)
    with open(os.path.join(OUT, "nli_sample.jsonl"), "w", encoding="utf-8") as f:
        for row in nli[:256]:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    # retrieval's held-out pairs (eval.retrieval=auto): rows neither stage of the default job reads
    with open(os.path.join(OUT, "nli_heldout.jsonl"), "w", encoding="utf-8") as f:
        for row in nli[556:812]:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    train = sts_rows("sts-train.csv")
    rng.shuffle(train)
    sentences = [r[5] for r in train[:300]] + [r["query"] for r in nli[256:556]]
    with open(os.path.join(OUT, "stage1_sample.jsonl"), "w", encoding="utf-8") as f:
        for s in sentences:
            f.write(json.dumps({"context": s, "instruction": AUTOENCODE, "output": s}, ensure_ascii=False) + "\n")
    dev = sts_rows("sts-dev.csv")
    rng.shuffle(dev)
    with open(os.path.join(OUT, "sts_dev_sample.csv"), "w", encoding="utf-8") as f:
        for r in dev[:300]:
            f.write("\t".join(r[:7]) + "\n")


if __name__ == "__main__":
    main()
