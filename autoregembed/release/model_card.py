"""The export's model card (``README.md``): Hub metadata, usage that runs as written, how it was
trained and what it scored.  Rendered from ``autoregembed.json`` alone (``ExportMeta``, whose
``training`` field the trainer fills), so it can be written again when a result arrives.

Why: an export is what people publish; without a card the Hub shows no usage, no base model, no
license and no sentence-similarity widget.
"""
from __future__ import annotations

import dataclasses
import os

import yaml

from ..ground.atomic import atomic_write_text
from .meta import ExportMeta
from .instructions import prompts

CARD_FILE = "README.md"
EXAMPLE = ["A man is playing a guitar.", "Someone is playing an instrument.", "The stock market fell sharply today."]


def base_card_metadata(base: str | None) -> dict:
    """The metadata block of the base model's own card (a local folder's README.md, or the Hub
    cache's copy); {} when there is none."""
    if not base:
        return {}
    path = os.path.join(base, CARD_FILE)
    if not os.path.isfile(path):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(base, CARD_FILE, local_files_only=True)
        except Exception:  # not a hub id, not cached, no hub library: nothing to read
            return {}
    return _front_matter(open(path, encoding="utf-8").read())


def base_license(base: str | None) -> str:
    """The base model's license; "other" when its card names none, so nobody is told a license it
    does not have."""
    value = base_card_metadata(base).get("license")
    return value if isinstance(value, str) and value else "other"


def _front_matter(text: str) -> dict:
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    try:
        data = yaml.safe_load(text[4:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _hub_id(name: str | None) -> str | None:
    """``org/name`` when ``name`` reads as a Hub id rather than a local path."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        return None
    parts = name.split("/")
    return name if len(parts) == 2 and all(parts) else None


def card_text(folder: str, meta: ExportMeta) -> str:
    """The card for the export in ``folder``: a path, or the Hub repository id it is pushed to (it
    appears in the usage code, which runs as written)."""
    results = meta.evaluation
    training = meta.training or {}
    base = meta.base_model
    base_card = base_card_metadata(base)
    metadata = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
                "tags": ["sentence-transformers", "feature-extraction", "sentence-similarity", "autoregembed"],
                "license": base_license(base)}
    if base_card.get("language"):  # the base's languages: what the embedder can read
        metadata["language"] = base_card["language"]
    if _hub_id(base):
        metadata["base_model"] = _hub_id(base)
    datasets = [d for d in (_hub_id(x) for x in training.get("data", [])) if d]
    if datasets:
        metadata["datasets"] = datasets
    k, name, table = meta.num_embed_tokens, _title(folder), prompts(meta)
    if results:
        metadata["model-index"] = [{"name": name, "results": _model_index(results)}]
    template = f"[BOS]{{text}}\\n{meta.instruction}\\n" + "".join(f"<EMBED{i}>" for i in range(k))
    pooled = meta.pooled_positions
    which = (f"the {k} EMBED tokens" if pooled is None else
             f"EMBED tokens {', '.join(f'<EMBED{i}>' for i in pooled)} (of the {k} it reads)")
    pick = "" if pooled is None else f"[{pooled}]"  # the transformers example: those rows of the k states
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             "A text-embedding model trained with [AutoRegEmbed](https://arxiv.org/abs/2502.11401)"
             + (f" from `{base}`" if base else "") + f" ({meta.stage or 'untrained'} export). The model reads",
             f"`{template}` and its embedding is the mean of the last-layer states of {which},",
             "L2-normalised; compare embeddings by cosine similarity.", "",
             "## Usage", "", "sentence-transformers (the instruction and EMBED tokens are in the tokenizer's template):",
             "", "```python", "from sentence_transformers import SentenceTransformer", "",
             f"model = SentenceTransformer({folder!r})", f"sentences = {EXAMPLE!r}",
             "embeddings = model.encode(sentences)", "print(model.similarity(embeddings, embeddings))",
             f"queries = model.encode_query(sentences)  # instruction: {table['query']}",
             f"documents = model.encode_document(sentences)  # instruction: {table['document']}", "```", "",
             "A serving stack must run the `1_WordWeights` module: it keeps only the EMBED tokens' states for the",
             "mean. One that skips it and pools every token computes different embeddings without a word.", "",
             "autoregembed's own encoder (`instruction=` overrides the one trained with):", "",
             "```python", "from autoregembed import Encoder", "", f"model = Encoder.from_pretrained({folder!r})",
             f"sentences = {EXAMPLE!r}", "embeddings = model.encode(sentences)  # L2-normalised rows",
             "queries = model.encode_query(sentences)  # also encode_document",
             "print(embeddings @ embeddings.T)", "```", "", "transformers alone:", "", "```python", "import torch",
             "from transformers import AutoModel, AutoTokenizer", "",
             f"tokenizer = AutoTokenizer.from_pretrained({folder!r})  # appends the instruction and the EMBED tokens",
             f"model = AutoModel.from_pretrained({folder!r}).eval()", f"sentences = {EXAMPLE!r}",
             "batch = tokenizer(sentences, padding=True, truncation=True, return_tensors=\"pt\")",
             "with torch.no_grad():",
             "    hidden = model(input_ids=batch[\"input_ids\"], attention_mask=batch[\"attention_mask\"]).last_hidden_state",
             "ends = batch[\"attention_mask\"].sum(dim=1)  # right padding: each row ends with its EMBED tokens",
             f"embeddings = torch.stack([hidden[i, end - {k} : end]{pick}.mean(dim=0) for i, end in enumerate(ends)])",
             "embeddings = torch.nn.functional.normalize(embeddings, dim=-1)", "print(embeddings @ embeddings.T)",
             "```", "", "## Training", ""]
    if training:
        lines += [f"- {key}: {_value(value)}" for key, value in training.items()]
    else:
        lines.append("Not recorded (exported outside the trainer).")
    lines += [f"- embedding tokens k: {k}", f"- instruction: `{meta.instruction}` (queries: `{table['query']}`, "
              f"documents: `{table['document']}`)",
              f"- text budget: {meta.max_text_len} tokens", "", "## Evaluation", ""]
    if results:
        lines += ["| data | Spearman x100 | mean pairwise cosine |", "| --- | --- | --- |",
                  f"| {os.path.basename(results.get('sts', 'STS'))} | {results['spearman_x100']:.2f} | "
                  f"{results.get('mean_pairwise_cosine', float('nan')):.3f} |"]
        if "base_spearman_x100" in results:
            lines.append(f"| the same, untrained base `{results['base_model']}` (mean of its EMBED states) | "
                         f"{results['base_spearman_x100']:.2f} | |")
        if "retrieval" in results:
            lines += ["", "| retrieval | nDCG@10 | MRR@10 | recall@100 |", "| --- | --- | --- | --- |"]
            for label, r in (("this model", results["retrieval"]), ("the untrained base", results.get("base_retrieval"))):
                if r:
                    lines.append(f"| {os.path.basename(os.path.normpath(r['set']))} ({r['queries']} queries), {label} | "
                                 f"{r['ndcg@10']:.4f} | {r['mrr@10']:.4f} | {r['recall@100']:.4f} |")
    else:
        lines.append("Not evaluated yet (`autoregembed eval --model <folder> --sts <file>` or `--mteb <tasks>`).")
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```"]
    return "\n".join(lines) + "\n"


CITATION = """@inproceedings{deng-etal-2025-following,
  title = "Following the Autoregressive Nature of {LLM} Embeddings via Compression and Alignment",
  author = "Deng, Jingcheng and Jiang, Zhongtao and Pang, Liang and Wei, Zihao and Chen, Liwei and Xu, Kun and
            Song, Yang and Shen, Huawei and Cheng, Xueqi",
  booktitle = "Proceedings of the 2025 Conference on Empirical Methods in Natural Language Processing",
  year = "2025",
  address = "Suzhou, China",
  publisher = "Association for Computational Linguistics",
  url = "https://aclanthology.org/2025.emnlp-main.639/",
  pages = "12672--12688"
}"""


def _model_index(results: dict) -> list[dict]:
    """The measured results in the Hub's model-index form (what its widget and leaderboards read)."""
    out = [{"task": {"type": "STS"},
            "dataset": {"name": os.path.basename(results.get("sts", "STS")), "type": "sts"},
            "metrics": [{"type": "cos_sim_spearman", "value": results["spearman_x100"]}]}]
    if "retrieval" in results:
        r = results["retrieval"]
        out.append({"task": {"type": "Retrieval"},
                    "dataset": {"name": os.path.basename(os.path.normpath(r["set"])), "type": "retrieval"},
                    "metrics": [{"type": metric.replace("@", "_at_"), "value": r[metric]}
                                for metric in ("ndcg@10", "mrr@10", "recall@100")]})
    return out


def _title(folder: str) -> str:
    """The folder's name; a trainer export (``<run>/<stage>/model``) is called ``<run>-<stage>``."""
    path = os.path.abspath(folder)
    if os.path.basename(path) == "model":
        stage_dir = os.path.dirname(path)
        return f"{os.path.basename(os.path.dirname(stage_dir))}-{os.path.basename(stage_dir)}"
    return os.path.basename(path)


def _value(value) -> str:
    if isinstance(value, list):
        return ", ".join(f"`{os.path.basename(str(v))}`" for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def write_model_card(folder: str, results: dict | None = None) -> str:
    """(Re)write ``folder``'s README.md from its autoregembed.json; ``results`` (an
    ``evaluate.sts_report``) are recorded there first, so a later card (``push``) shows them too."""
    meta = ExportMeta.read(folder)
    if results is not None:
        meta = dataclasses.replace(meta, evaluation=results)
        meta.write(folder)
    path = os.path.join(folder, CARD_FILE)
    atomic_write_text(path, card_text(folder, meta))
    return path
