"""An exported model under MTEB 2's encoder protocol, with one instruction per task type.

``encode(inputs: DataLoader, *, task_metadata, hf_split, hf_subset, prompt_type)``: the
instruction goes into our template's instruction slot (text, then instruction, then the EMBED
tokens), chosen from the export's table (instructions.py, updated with ``instructions``) in MTEB's
order, the order MTEB's sentence-transformers wrapper uses on the same table.
"""
from __future__ import annotations

import datetime
import os

import mteb
import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction

from .encoder import Encoder
from ..ground import hub
from ..ground.errors import InputError
from .meta import META_FILE, ExportMeta
from .instructions import instruction_for, prompts

LANGUAGES = {"en": "eng-Latn", "zh": "zho-Hans", "de": "deu-Latn", "fr": "fra-Latn", "es": "spa-Latn",
             "it": "ita-Latn", "pt": "por-Latn", "ru": "rus-Cyrl", "ja": "jpn-Jpan", "ko": "kor-Hang", "ar": "arb-Arab"}


def model_meta(path: str, meta: ExportMeta, hidden_size: int, n_parameters: int, bytes_per_parameter: int = 4,
               n_embedding_parameters: int | None = None) -> ModelMeta:
    """MTEB's description of an export; results are filed under ``autoregembed/<run>-<stage>-model``
    (the folder's last three path parts: every export's own folder is called ``model``).  License
    and languages come from the base model's own card; the release date is the export's; the
    training datasets are the files the stage read (none of them an MTEB task's name)."""
    from .model_card import base_card_metadata, base_license

    name = "-".join(os.path.abspath(path).split(os.sep)[-3:])
    languages = base_card_metadata(meta.base_model).get("language") or []
    languages = [LANGUAGES[x] for x in ([languages] if isinstance(languages, str) else languages) if x in LANGUAGES]
    released = datetime.date.fromtimestamp(os.path.getmtime(os.path.join(path, META_FILE))).isoformat()
    data = (meta.training or {}).get("data", [])
    license = base_license(meta.base_model)
    return ModelMeta(
        loader=None, name=f"autoregembed/{name}", revision="local",
        release_date=released, languages=languages or None, n_parameters=n_parameters,
        n_embedding_parameters=n_embedding_parameters,
        memory_usage_mb=round(n_parameters * bytes_per_parameter / 2**20, 1),
        max_tokens=meta.max_text_len, embed_dim=hidden_size,
        license="not specified" if license == "other" else license, open_weights=True,
        public_training_code="https://arxiv.org/abs/2502.11401", public_training_data=False,
        framework=["PyTorch", "Transformers", "safetensors", "Sentence Transformers"],
        similarity_fn_name=ScoringFunction.COSINE, use_instructions=True,
        training_datasets={os.path.basename(str(d)) for d in data},
        adapted_from=meta.base_model, modalities=["text"])


class AutoRegEmbedMTEB(AbsEncoder):
    """``mteb.evaluate(AutoRegEmbedMTEB(path), tasks)``."""

    def __init__(self, model_name: str, revision: str | None = None, *, device: str | None = None,
                 instructions: dict[str, str] | None = None, batch_size: int = 32, **kwargs):
        self.model = Encoder.from_pretrained(model_name, device=device)
        self.export_meta = ExportMeta.read(model_name)
        self.instructions = {**prompts(self.export_meta), **(instructions or {})}
        self.batch_size = batch_size
        self.mteb_model_meta = model_meta(model_name, self.export_meta, self.model.model.config.hidden_size,
                                          sum(p.numel() for p in self.model.model.parameters()),
                                          next(self.model.model.parameters()).element_size(),
                                          self.model.model.get_input_embeddings().weight.numel())

    def instruction_for(self, task_metadata, prompt_type=None) -> str:
        return instruction_for(self.instructions, self.export_meta.instruction, task_metadata.name, task_metadata.type,
                               None if prompt_type is None else prompt_type.value)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs):
        """Float64 embeddings, so MTEB's cosines rank near-equal pairs by value, not by float32
        rounding (and agree with ``autoregembed eval --sts``)."""
        texts = [t for batch in inputs for t in batch["text"]]
        emb = self.model.encode(texts, batch_size=kwargs.get("batch_size", self.batch_size),
                                instruction=self.instruction_for(task_metadata, prompt_type),
                                show_progress_bar=kwargs.get("show_progress_bar", False))
        return emb.astype(np.float64)


def local_sts_task(path: str, name: str = "LocalSTS"):
    """An MTEB STS task over a local STS-B format file (evaluate.read_sts), evaluated as "test"."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    from .evaluate import read_sts

    a, b, gold = read_sts(path)

    class LocalSTS(AbsTaskSTS):
        metadata = TaskMetadata(
            name=name, description=f"STS pairs from {path}", reference=None,
            dataset={"path": os.path.abspath(path), "revision": "local"}, type="STS", category="t2t",
            modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"], main_score="cosine_spearman",
            date=None, domains=None, task_subtypes=None, license=None, annotations_creators=None,
            dialect=None, sample_creation=None, bibtex_citation="")
        min_score, max_score = float(gold.min()), float(gold.max())

        def load_data(self, num_proc=None, **kwargs):
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"sentence1": a, "sentence2": b, "score": [float(g) for g in gold]})})
            self.data_loaded = True

    return LocalSTS()


def _check_task_data(name: str, task):
    """The task's data is in the local cache or on the hub (one quick request): a node without network
    is told in one line, not after mteb's retries."""
    from huggingface_hub import snapshot_download

    data = task.metadata.dataset
    repo, revision = data["path"], data.get("revision")
    what = f"--mteb {name}: its data {repo}"
    try:
        snapshot_download(repo, repo_type="dataset", revision=revision, local_files_only=True)
        return
    except Exception:  # noqa: BLE001 - not (wholly) cached: the hub must have it
        pass
    if hub.offline():
        raise hub.HubError(f"{what}: HF_HUB_OFFLINE is set, and it is not in the local cache")
    hub.check_repo(repo, "dataset", what)


def run_mteb(model_path: str, task_names: list[str], output_dir: str, batch_size: int = 32) -> dict:
    """Run MTEB tasks and file mteb's result JSONs under ``output_dir``; returns {task name: main
    score x100}.  A name that is a file is a local STS-B format file (``local_sts_task``)."""
    from mteb.cache import ResultCache

    local = [n for n in task_names if os.path.isfile(n)]
    named = [n for n in task_names if n not in local]
    tasks = [local_sts_task(p, "LocalSTS-" + os.path.splitext(os.path.basename(p))[0]) for p in local]
    for name in named:  # an unknown name, or data the hub cannot give, fails here, before the model loads
        try:
            found = list(mteb.get_tasks(tasks=[name]))
        except KeyError:
            raise InputError(f"--mteb: no MTEB task named {name!r} (and no such file)") from None
        for task in found:
            _check_task_data(name, task)
        tasks += found
    model = AutoRegEmbedMTEB(model_path, batch_size=batch_size)
    with hub.answering(f"--mteb {','.join(task_names)}"):
        result = mteb.evaluate(model, tasks, cache=ResultCache(output_dir), overwrite_strategy="always",
                               show_progress_bar=True)  # minutes per task at 7B: never silent
    return {r.task_name: round(100 * r.get_score(), 2) for r in result.task_results}
