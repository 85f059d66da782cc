"""Run configuration: YAML files validated into dataclasses, plus ``--set key=value`` overrides.

Everything that can be wrong with a configuration (unknown keys, wrong types, missing
files, batch sizes that do not multiply out) is reported here, before any model loads,
with a message naming the key.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

import yaml

from ..release.mining import check_mining
from ..ground.errors import ConfigError, InputError, finite  # noqa: F401 - ConfigError: importable from here too
from .layout import Layout

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # autoregembed/
RESOURCES = os.path.join(PACKAGE, "resources")
PROJECT_ROOT = os.path.dirname(PACKAGE)
SHARED_STSB_DEV = os.path.join(PROJECT_ROOT, "..", "shared", "data", "stsb", "sts-dev.csv")


LR_SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class ModelConfig:
    base: str = "tiny"  # "tiny": a small LLaMA built from a config (the CPU default); else an HF folder or hub name
    num_embed_tokens: int = 5
    dtype: str = "auto"  # auto (bf16 where the hardware has it, else fp32) | bf16 | fp16 | fp32
    # auto: flash_attention_2 when installed; on CUDA without it and with packing, PyTorch's varlen
    # flash kernel (packing.VARLEN); else sdpa
    attn_implementation: str = "auto"
    # run every encoder and decoder pass padding-free, the rows packed into one sequence
    # (packing.py); null: on CUDA only (on CPU the packed reference attention is O(tokens^2))
    packing: typing.Optional[bool] = None
    gradient_checkpointing: bool = True
    # the frozen decoder's own activation checkpointing (null: as gradient_checkpointing; true: every
    # layer; false: none; n: its first n layers, the others keep their activations); each layer not
    # recomputed saves its forward's recompute (+50% of its FLOPs) where the memory allows
    # (`autoregembed plan` prints the fewest layers to recompute that fit)
    decoder_checkpointing: typing.Optional[typing.Union[bool, int]] = None
    # before stage 1, rescale the encoder's final norm so the compressed tokens have the decoder's
    # word-embedding RMS per dimension (decoder_scale.py); false: the authors' setup, unscaled
    match_decoder_scale: bool = True
    # the frozen decoder reads its BOS token before e_1..e_k (an attention sink, so e_1 need not
    # become one; model.py); false: the decoder input as published. Stage 1, reference scores
    # and stage 2 must agree (the reference-score fingerprint includes it). On by default, as are
    # shared_prefix and stage1_loss.contrast: together they measured best (docs/guide.md has the
    # authors' recipe)
    decoder_bos: bool = True
    # stage 1: the frozen decoder reads n learned vectors, the same for every text, between e_1..e_k
    # and the target, fitted before stage 1 to what fits every text (shared_prefix.py); they travel
    # with the stage-1 export to reference scores and stage 2. 0: the decoder input as published
    shared_prefix: int = 5
    shared_prefix_steps: int = 100  # Adam steps of the fit, over the decoder-scale sample's micro-batches
    shared_prefix_lr: float = 1e-2
    # where the frozen decoder lives under ZeRO-3: false, whole on every GPU outside the DeepSpeed
    # engine (no all-gather of weights that never get a gradient, in every forward, backward and
    # recompute; 13.5 GB at 7B in bf16); true, partitioned inside the engine with the encoder,
    # when a replica does not fit (`autoregembed plan` prints both)
    shard_decoder: bool = False
    lora_rank: int = 0  # 0: full fine-tune; > 0: LoRA adapters on the encoder, merged into every export
    lora_alpha: float = 0.0  # 0: 2 x lora_rank
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"  # or comma-separated module names, e.g. q_proj,v_proj
    # with lora_rank > 0: the training stages that train through LoRA, comma-separated; the others train
    # every weight (e.g. stage2: stage 1 compresses with a full fine-tune, stage 2 aligns through adapters)
    lora_stages: str = "stage1,stage2"
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    # the tiny base's own seed, apart from the run's: it stands in for a downloaded model, which a
    # run's seed does not change (nor the folder it is built in once, output_dir/base)
    tiny_seed: int = 0

    def trains_lora(self, stage: str) -> bool:
        """Whether training ``stage`` trains LoRA adapters (model.lora_rank, model.lora_stages)."""
        return self.lora_rank > 0 and stage in [x.strip() for x in self.lora_stages.split(",")]

    def check(self, key: str):
        """Its values, each error naming ``key.<field>`` (as every section's ``check``)."""
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"key '{key}.dtype': {self.dtype!r} is not auto, bf16, fp16 or fp32")
        if self.num_embed_tokens < 1:
            raise ConfigError(f"key '{key}.num_embed_tokens' must be >= 1")
        if self.lora_rank < 0:
            raise ConfigError(f"key '{key}.lora_rank' must be >= 0 (0: full fine-tune)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"key '{key}.lora_dropout' must be in [0, 1)")
        if not (finite(self.lora_alpha) and self.lora_alpha >= 0):
            raise ConfigError(f"key '{key}.lora_alpha' must be a finite number >= 0, got {self.lora_alpha}")
        bad = [x for x in self.lora_stages.split(",") if x.strip() not in ("stage1", "stage2")]
        if bad or not self.lora_stages.strip():
            raise ConfigError(f"key '{key}.lora_stages': {self.lora_stages!r} is not a comma-separated list of "
                              f"stage1 and stage2")
        if self.tiny_hidden_size < 4 or self.tiny_hidden_size % 4 or self.tiny_layers < 1:
            raise ConfigError(f"keys '{key}.tiny_hidden_size' (a multiple of 4: 4 attention heads) and "
                              f"'{key}.tiny_layers' must be >= 1")
        if self.shared_prefix < 0 or self.shared_prefix_steps < 0 or not (finite(self.shared_prefix_lr)
                                                                          and self.shared_prefix_lr > 0):
            raise ConfigError(f"keys '{key}.shared_prefix' and '{key}.shared_prefix_steps' must be >= 0 and "
                              f"'{key}.shared_prefix_lr' a finite number > 0, got {self.shared_prefix}, "
                              f"{self.shared_prefix_steps}, {self.shared_prefix_lr}")
        if isinstance(self.decoder_checkpointing, int) and not isinstance(self.decoder_checkpointing, bool) \
                and self.decoder_checkpointing < 0:
            raise ConfigError(f"key '{key}.decoder_checkpointing': true, false or a number of decoder layers >= 0, "
                              f"got {self.decoder_checkpointing}")
        if self.shared_prefix and self.shard_decoder:
            raise ConfigError(f"key '{key}.shared_prefix': it is fitted through a whole decoder, not one partitioned "
                              f"under ZeRO-3; set {key}.shared_prefix=0 (the decoder input as published) or "
                              f"{key}.shard_decoder=false")


@dataclass
class SourceConfig:
    """One dataset of a stage (``data.stage1`` / ``data.stage2`` as a list of these)."""

    path: str = ""  # .jsonl/.json/.parquet file, a save_to_disk or shard folder, or a hub dataset name
    weight: typing.Optional[float] = None  # its share of each epoch's rows; null: its size (give all or none)
    columns: typing.Dict[str, str] = field(default_factory=dict)  # our field -> its column, e.g. {query: anchor}
    instruction: typing.Optional[str] = None  # for rows that carry none
    document_instruction: typing.Optional[str] = None  # stage 2: the positive's, for rows that carry none


@dataclass
class DataConfig:
    # a file, folder or hub dataset; several separated by commas; or a list of SourceConfig mappings
    stage1: typing.Union[str, typing.List[SourceConfig]] = os.path.join(RESOURCES, "stage1_sample.jsonl")
    stage2: typing.Union[str, typing.List[SourceConfig]] = os.path.join(RESOURCES, "nli_sample.jsonl")
    same_source_batches: bool = False  # every micro-batch from one source (data.MixtureSampler)
    max_text_len: int = 64
    max_target_len: int = 64
    max_negatives: typing.Optional[int] = None  # None: every negative of a row is scored
    # stage 2: each query's negatives are its own plus every other row's positive and negatives in the
    # micro-batch, all scored in the one decoder pass (batches.with_in_batch_negatives); with
    # reference.source=file the reference stage scores exactly the pairs stage 2's schedule forms
    in_batch_negatives: bool = False
    # with in_batch_negatives: the pool is every rank's micro-batch, not only this rank's, so the
    # negatives grow with the world size (the sampler is a pure function of the step, so each rank
    # forms the other ranks' rows itself: nothing is communicated)
    cross_device_negatives: bool = False

    def sources(self, stage: int) -> list[SourceConfig]:
        """The datasets of stage 1 or 2: ``stageN`` as a list (a string with commas that is no
        existing path names several)."""
        value = self.stage1 if stage == 1 else self.stage2
        if isinstance(value, list):
            return value
        parts = value.split(",") if "," in value and not os.path.exists(value) else [value]
        return [SourceConfig(path=p.strip()) for p in parts if p.strip()]

    def check(self, key: str):
        from ..ground.data import STAGE1_FIELDS, STAGE2_FIELDS

        for stage, fields in ((1, STAGE1_FIELDS), (2, STAGE2_FIELDS)):
            sources, skey = self.sources(stage), f"{key}.stage{stage}"
            if not sources:
                raise ConfigError(f"key '{skey}': no data source given")
            for i, s in enumerate(sources):
                where = f"{skey}[{i}]" if isinstance(getattr(self, f"stage{stage}"), list) else skey
                if not s.path:
                    raise ConfigError(f"key '{where}.path' is missing")
                unknown = sorted(set(s.columns) - set(fields))
                if unknown:
                    raise ConfigError(f"key '{where}.columns': {', '.join(unknown)} is not a field of stage-{stage} "
                                      f"rows ({', '.join(fields)})")
                if s.weight is not None and not (finite(s.weight) and s.weight > 0):
                    raise ConfigError(f"key '{where}.weight' must be a finite number > 0, got {s.weight}")
            if len({s.weight is None for s in sources}) > 1:
                raise ConfigError(f"key '{skey}': give every source a weight or none (their shares are relative)")
        for k in ("max_text_len", "max_target_len"):
            if getattr(self, k) < 1:
                raise ConfigError(f"key '{key}.{k}' must be >= 1, got {getattr(self, k)}")
        if self.max_negatives is not None and self.max_negatives < 1:
            raise ConfigError(f"key '{key}.max_negatives' must be >= 1 (or null: all), got {self.max_negatives}")
        if self.cross_device_negatives and not self.in_batch_negatives:
            raise ConfigError(f"key '{key}.cross_device_negatives' needs {key}.in_batch_negatives=true (it widens "
                              f"their pool)")


@dataclass
class OptimConfig:
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 5
    # after the linear warm-up: linear decay to 0 at max_steps, cosine decay to 0, or constant
    lr_schedule: str = "linear"
    max_steps: int = 60
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    global_batch_size: typing.Optional[int] = None  # if set, must equal micro x accumulation x world size
    # end this run after that many optimizer steps: a checkpoint is saved, nothing is exported, and
    # --resume continues (e.g. to fit a job time limit); None: run to max_steps
    stop_after: typing.Optional[int] = None
    gradient_clipping: float = 1.0
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_last: int = 2
    log_every: int = 10

    def check(self, key: str):
        for k in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "log_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"key '{key}.{k}' must be >= 1, got {getattr(self, k)}")
        for k in ("warmup_steps", "save_every", "keep_last"):
            if getattr(self, k) < 0:
                raise ConfigError(f"key '{key}.{k}' must be >= 0, got {getattr(self, k)}")
        for k in ("learning_rate", "weight_decay", "gradient_clipping"):
            if not (finite(getattr(self, k)) and getattr(self, k) >= 0):
                raise ConfigError(f"key '{key}.{k}' must be a finite number >= 0, got {getattr(self, k)}")
        if self.learning_rate == 0:  # a stage that cannot learn would run, and export its start, with exit 0
            raise ConfigError(f"key '{key}.learning_rate' must be > 0: at 0 the stage trains nothing")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"key '{key}.lr_schedule': {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        for k in ("global_batch_size", "stop_after"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ConfigError(f"key '{key}.{k}' must be >= 1, got {getattr(self, k)}")


def _components() -> dict:
    """section -> the registry its ``kind`` picks from, imported when the loader first reads it."""
    from ..method.losses import STAGE1_OBJECTIVES, STAGE2_OBJECTIVES
    from ..method.scorers import SCORERS

    return {"scorer": SCORERS, "stage1_loss": STAGE1_OBJECTIVES, "loss": STAGE2_OBJECTIVES}


@dataclass
class ScorerConfig:
    """The LM head's scorer backend (method/scorers.py): ``kind`` names a class of scorers.SCORERS, whose
    settings are keys of this section too, built by the loader into ``backend``.

    fused: ours, with ``row_stats`` auto (the Triton kernel on CUDA, PyTorch elsewhere) | triton (on CPU
    only under TRITON_INTERPRET=1) | torch; cce: Apple's cut-cross-entropy (exact gradients: no filtering)."""

    KINDS = staticmethod(lambda: _components()["scorer"])
    COMPONENT = "backend"  # the field the loader builds from the kind's class
    kind: str = "fused"
    backend: typing.Any = field(default_factory=lambda: _components()["scorer"]["fused"]())

    def check(self, key: str):
        self.backend.check(key)


@dataclass
class StageOneLossConfig:
    """``kind`` names stage 1's objective (losses.STAGE1_OBJECTIVES); its settings are keys of this
    section too, built by the loader into ``objective``, the object stage 1 calls.

    compression (losses.CompressionLoss): the reconstruction loss, plus ``contrast`` times an in-batch
    contrast (0: the authors' loss): each target is also scored with the previous row's compressed
    tokens, and softplus(-(own - other) per token) rewards compressed tokens that fit their own text
    better than another's; one more decoder pass over the micro-batch. 4 with model.shared_prefix
    measured best (docs/guide.md)."""

    KINDS = staticmethod(lambda: _components()["stage1_loss"])
    COMPONENT = "objective"  # the field the loader builds from the kind's class
    kind: str = "compression"
    objective: typing.Any = field(default_factory=lambda: _components()["stage1_loss"]["compression"](contrast=4.0))

    def check(self, key: str):
        self.objective.check(key)


@dataclass
class LossConfig:
    """``kind`` names stage 2's objective (losses.STAGE2_OBJECTIVES); the kind's own settings
    (``loss.beta``, ``loss.tau``, ... for alignment) are keys of this section too, built by the loader
    into ``objective``, the object stage 2 calls."""

    KINDS = staticmethod(lambda: _components()["loss"])
    COMPONENT = "objective"  # the field the loader builds from the kind's class
    kind: str = "alignment"  # alignment: the paper's loss; infonce: the contrastive baseline (losses.py)
    objective: typing.Any = field(default_factory=lambda: _components()["loss"]["alignment"]())

    def check(self, key: str):
        self.objective.check(key)


@dataclass
class ReferenceConfig:
    """Where stage 2's reference values come from (stages.Reference)."""

    # file: the reference stage scores every stage-2 row into a file keyed by its content
    # (paths.reference_scores); online: stage 2 scores them itself with its LoRA adapters disabled
    # (= the stage-1 model), no file
    source: str = "file"
    micro_batch_size: typing.Optional[int] = None  # rows per scoring call on each rank; null: stage 2's

    def check(self, key: str):
        if self.source not in ("file", "online"):
            raise ConfigError(f"key '{key}.source': {self.source!r} is not 'file' or 'online'")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"key '{key}.micro_batch_size' must be >= 1 (or null: stage 2's), got "
                              f"{self.micro_batch_size}")


@dataclass
class PathsConfig:
    stage1_model: typing.Optional[str] = None  # default: <output_dir>/stage1/model
    reference_scores: typing.Optional[str] = None  # default: <output_dir>/reference/scores.safetensors
    export_from: str = "stage2"  # which stage's latest checkpoint `export` consolidates


KEEP_BEST = {"ndcg@10": "retrieval_ndcg@10", "mrr@10": "retrieval_mrr@10", "recall@100": "retrieval_recall@100",
             "sts": "sts_spearman"}  # eval.keep_best -> the step record's key


@dataclass
class EvalConfig:
    sts_file: str = "auto"  # auto: ../shared STS-B dev when present, else the bundled sample
    # retrieval (release/retrieval.py: nDCG@10, MRR@10, recall@100): a BEIR folder, or a JSONL of stage-2
    # rows ({query, pos, neg}: each query's positive is its relevant document); auto: the bundled NLI
    # pairs held out of the bundled training data; none: off
    retrieval: str = "auto"
    instruction: str = "Retrieve semantically similar text."  # default instruction stored with exports
    # what encode_query / encode_document (sentence-transformers, Encoder) and MTEB's query and
    # passage sides use (instructions.py); null: eval.instruction
    query_instruction: typing.Optional[str] = None
    document_instruction: typing.Optional[str] = None
    # which compressed tokens an export's embedding averages (method/model.py pooled_positions): all (the
    # published mean of e_1..e_k) | all_but_last | 1-based positions, e.g. 1,2,3. Stored in the export;
    # `autoregembed eval --pooling` tries another on an export. all_but_last measured best (docs/guide.md)
    pooling: str = "all_but_last"
    # also score the untrained base model, read as the export reads text (Encoder.untrained): the floor the
    # trained model must beat, in eval/result.json and the log, with a warning when the model is below it
    compare_base: bool = True
    # a pipeline's eval of stage 2's export also scores the stage-1 export it started from, read the same
    # way, with a warning when stage 2 made the embedding worse than its start (it can: docs/experiments.md)
    compare_stage1: bool = True
    batch_size: int = 64
    # every N optimizer steps of a training stage, STS Spearman of the model in training on sts_file
    # (sts_spearman in metrics.jsonl, the progress line and the plot), and its retrieval on eval.retrieval
    # (retrieval_ndcg@10, retrieval_mrr@10, retrieval_recall@100): a collapse seen while it happens; 0: off
    every: int = 0
    # a metric of eval.every (ndcg@10, mrr@10, recall@100 or sts): each training stage's export is the model
    # of the evaluation that scored best on it, not the last step's; empty: the last step's
    keep_best: str = ""

    def check(self, key: str):
        if self.batch_size < 1:
            raise ConfigError(f"key '{key}.batch_size' must be >= 1, got {self.batch_size}")
        if self.every < 0:
            raise ConfigError(f"key '{key}.every' must be >= 0 (0: off), got {self.every}")
        if self.keep_best and self.keep_best not in KEEP_BEST:
            raise ConfigError(f"key '{key}.keep_best': {self.keep_best!r} is not one of {', '.join(KEEP_BEST)} "
                              f"(or empty: the last step's export)")
        if self.keep_best and not self.every:
            raise ConfigError(f"key '{key}.keep_best' compares the evaluations of {key}.every, which is 0 (off); "
                              f"set {key}.every=N")
        if self.keep_best not in ("", "sts") and self.retrieval == "none":
            raise ConfigError(f"key '{key}.keep_best': {self.keep_best} is a retrieval metric, but "
                              f"{key}.retrieval is none")

    @property
    def sts_path(self) -> str:
        """The STS file eval.sts_file names (auto: ../shared STS-B dev when present, else the bundled sample)."""
        if self.sts_file != "auto":
            return self.sts_file
        return SHARED_STSB_DEV if os.path.exists(SHARED_STSB_DEV) else os.path.join(RESOURCES, "sts_dev_sample.csv")

    @property
    def retrieval_path(self) -> str | None:
        """What eval.retrieval names, None when it is off."""
        if self.retrieval == "none":
            return None
        return os.path.join(RESOURCES, "nli_heldout.jsonl") if self.retrieval == "auto" else self.retrieval

    @property
    def keep_best_key(self) -> str:
        """The step record's key of ``keep_best``."""
        return KEEP_BEST[self.keep_best]


@dataclass
class MineConfig:
    """The optional ``mine`` stage (stages.Mine): hard negatives for every stage-2 row from the
    stage-1 model's embeddings (release/mining.py), written under <output_dir>/mine/; reference scores and
    stage 2 then train on the mined rows."""

    enabled: bool = False
    negatives: int = 7  # per row (fewer where a source runs out of passages)
    skip_top: int = 0  # ranks skipped before taking negatives
    max_similarity: float = 0.95  # passages at least this close (cosine) to the positive are likely positives
    range_max: int = 0  # only ranks below this are candidates (FlagEmbedding's range_for_sampling); 0: no limit
    # skip passages the query finds nearly as close as its positive: cosine above cos(q, pos) - absolute_margin,
    # or above cos(q, pos) x (1 - relative_margin) (sentence-transformers' mine_hard_negatives); null: off
    absolute_margin: typing.Optional[float] = None
    relative_margin: typing.Optional[float] = None
    sampling: str = "top"  # top: the most similar allowed passages; random: drawn among them (seeded)
    # exact: every passage scored for every query; faiss: an inverted-file index (release/mining.py
    # FaissSearch) of index_lists clusters (0: 4 x sqrt(passages)), index_probe of them read per query
    index: str = "exact"
    index_lists: int = 0
    index_probe: int = 32
    batch_size: int = 64

    def check(self, key: str):
        if self.batch_size < 1:
            raise ConfigError(f"key '{key}.batch_size' must be >= 1, got {self.batch_size}")
        try:
            check_mining(self.negatives, self.skip_top, self.max_similarity, self.range_max, self.absolute_margin,
                         self.relative_margin, self.sampling, name=lambda k: f"key '{key}.{k}'", index=self.index,
                         index_lists=self.index_lists, index_probe=self.index_probe)
        except InputError as e:
            raise ConfigError(str(e)) from None


@dataclass
class MonitorConfig:
    # DeepSpeed's monitor writers, output under <output_dir>/<stage>/monitor (metrics.jsonl is always written)
    tensorboard: bool = False
    csv: bool = False
    # Weights & Biases (monitor.WandbRun): one run per training stage, named <output_dir name>-<stage>,
    # grouped by the output_dir's name, its files under <output_dir>/<stage>/wandb (WANDB_MODE=offline works)
    wandb: bool = False
    wandb_project: str = "autoregembed"
    plot: bool = True  # a pipeline ends by writing <output_dir>/metrics.png (autoregembed plot)


@dataclass
class Config:
    stage: str = "pipeline"
    # auto: CUDA when present, else CPU | cuda: refuse to start without CUDA | cpu: ignore any GPU
    device: str = "auto"
    output_dir: str = "runs/default"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # the default job's stage 1 on the tiny model (docs/experiments.md); a real model sets its own
    stage1: OptimConfig = field(default_factory=lambda: OptimConfig(max_steps=300, micro_batch_size=16))
    stage2: OptimConfig = field(default_factory=lambda: OptimConfig(learning_rate=2e-4, max_steps=40))
    stage1_loss: StageOneLossConfig = field(default_factory=StageOneLossConfig)
    loss: LossConfig = field(default_factory=LossConfig)  # stage 2's
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    @property
    def layout(self) -> Layout:
        """Where every artifact of the run goes (layout.py)."""
        base = os.path.join(self.output_dir, "base") if self.model.base == "tiny" else self.model.base
        stage1 = self.paths.stage1_model or os.path.join(self.output_dir, "stage1", "model")
        scores = self.paths.reference_scores or os.path.join(self.output_dir, "reference", "scores.safetensors")
        return Layout(self.output_dir, base, stage1, scores)

    def sources(self, stage: int) -> list[SourceConfig]:
        """The datasets of stage 1 or 2 (``DataConfig.sources``)."""
        return self.data.sources(stage)

    def check(self):
        """Every section's own ``check``, then the rules that tie two sections together."""
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"key 'device': {self.device!r} is not auto, cuda or cpu")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "check"):
                section.check(f.name)
        if self.reference.source == "online" and self.loss.objective.needs_references \
                and not self.model.trains_lora("stage2"):
            raise ConfigError("key 'reference.source': 'online' needs LoRA in stage 2 (model.lora_rank > 0, stage2 in "
                              "model.lora_stages): the stage-1 model is then the stage-2 model with its adapters "
                              "disabled")
        from ..method.model import pooled_positions

        try:
            pooled_positions(self.eval.pooling, self.model.num_embed_tokens)
        except ValueError as e:
            raise ConfigError(f"key 'eval.pooling': {e}") from None
        instructions = {f"eval.{k}": getattr(self.eval, k) for k in ("instruction", "query_instruction",
                                                                      "document_instruction")}
        for stage in (1, 2):
            for i, s in enumerate(self.sources(stage)):
                instructions.update({f"data.stage{stage}[{i}].{k}": getattr(s, k)
                                     for k in ("instruction", "document_instruction")})
        for key, text in instructions.items():  # the tokenizer refuses its other special tokens at load
            if text is not None and "<EMBED" in text:
                raise ConfigError(f"key '{key}': holds '<EMBED', the text of the compressed tokens only the "
                                  f"encoder may place; write the instruction without it")
        need = self.stage1_loss.objective.min_micro_batch_size
        if self.stage1.micro_batch_size < need:
            raise ConfigError(f"key 'stage1.micro_batch_size' must be >= {need} for stage 1's objective "
                              f"{self.stage1_loss.objective}, which reads another row of each micro-batch")

    @property
    def is_pipeline(self) -> bool:
        """``stage: pipeline``: every stage in order, evaluating stage 2's export."""
        return self.stage == "pipeline"



def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X], or str | list of sources
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        tp = next((a for a in args if (typing.get_origin(a) or a) is type(value)), args[0])
        origin = typing.get_origin(tp)
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [_build(item, v, f"{key}[{i}].") if dataclasses.is_dataclass(item) else _coerce(v, item, f"{key}[{i}]")
                for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return {_coerce(k, str, f"{key} key"): _coerce(v, str, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, dict):
        raise ConfigError(f"key '{key}': expected a {'list' if origin is list else 'mapping'}, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, str) or tp is bool and isinstance(value, bool):
        return value
    if tp in (int, float) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"key '{key}': expected {tp.__name__}, got {value!r}")


MOVED = {  # keys of earlier releases -> where they live now (batching choices left the loss section)
    "loss.in_batch_negatives": "data.in_batch_negatives",
    "loss.cross_device_negatives": "data.cross_device_negatives",
    "loss.references": "reference.source",
    "model.scorer": "scorer.kind' (fused or cce) and 'scorer.row_stats",  # auto | triton | torch: row_stats
    "loss.stage1_contrast": "stage1_loss.contrast",  # stage 1's objective has its own section
}


def _build(cls, data: dict, prefix: str, default=None):
    """``data`` merged onto ``default`` (a section's own default instance, e.g. ``Config().stage1``, whose
    values differ from its class's), so setting one key never resets the section's other defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    component, component_data = None, {}
    if hasattr(cls, "KINDS"):  # a section whose ``kind`` picks a class: its fields are keys here too
        names.discard(cls.COMPONENT)
        kinds, kind = cls.KINDS(), data.get("kind", cls.kind)
        if kind not in kinds:
            raise ConfigError(f"key '{prefix}kind': {kind!r} is not one of {', '.join(kinds)}")
        component = kinds[kind]
        own = {f.name for f in dataclasses.fields(component)}
        component_data = {k: v for k, v in data.items() if k in own and k not in names}
        data = {k: v for k, v in data.items() if k not in component_data}
        names |= own
    for k in data:
        if f"{prefix}{k}" in MOVED:
            raise ConfigError(f"key '{prefix}{k}' is now '{MOVED[prefix + k]}'")
        if k not in names:
            raise ConfigError(f"unknown key '{prefix}{k}' (known: {', '.join(sorted(names))})")
    default = cls() if default is None else default
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, f"{prefix}{k}.", getattr(default, k))
        else:
            kwargs[k] = _coerce(v, tp, prefix + k)
    if component is not None:
        built = getattr(default, cls.COMPONENT)
        kwargs[cls.COMPONENT] = _build(component, component_data, prefix, built if isinstance(built, component) else None)
    return dataclasses.replace(default, **kwargs)


def _set_dotted(tree: dict, dotted: str, value):
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"key '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def load_config(path: typing.Optional[str] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file (or the built-in default when None) and apply ``key=value`` overrides."""
    tree = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config: {path} is a folder, not a YAML file" if os.path.isdir(path)
                              else f"--config: no such file {path}")
        with open(path) as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f"{path}:{mark.line + 1}" if mark is not None else path
                raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        _set_dotted(tree, k.strip(), _parse_override(k.strip(), v))
    cfg = _build(Config, tree, "")
    _expand_paths(cfg)
    cfg.check()
    return cfg


def _field_type(dotted: str):
    """The declared type of a dotted key, or None for an unknown one (``_build`` names it)."""
    cls = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def _parse_override(key: str, text: str):
    """``--set`` values: a string key takes the text as it is (``#``, ``[``, ``%`` included);
    anything else is read as YAML, with errors naming the key."""
    tp = _field_type(key)
    if tp is str or (typing.get_origin(tp) is typing.Union and str in typing.get_args(tp)):
        return None if text in ("null", "~", "") and tp is not str else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: {text!r} is not a valid value ({str(e).splitlines()[0]})") from None


PATH_KEYS = ("output_dir", "model.base", "data.stage1", "data.stage2", "paths.stage1_model",
             "paths.reference_scores", "eval.sts_file", "eval.retrieval")


def _expand_paths(cfg: Config):
    """``~`` and ``$VAR`` in every path, once, so every later use sees the same real path."""
    for dotted in PATH_KEYS:
        *parents, name = dotted.split(".")
        node = cfg
        for p in parents:
            node = getattr(node, p)
        value = getattr(node, name)
        if isinstance(value, str):
            setattr(node, name, os.path.expandvars(os.path.expanduser(value)))
        elif isinstance(value, list):  # data sources
            for source in value:
                source.path = os.path.expandvars(os.path.expanduser(source.path))


def looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path.endswith((".jsonl", ".json", ".parquet", ".csv"))


def _check_hub_model(name: str):
    """A ``model.base`` that is no local folder is a hub id: it must be cached or reachable now,
    not after a 30-second network timeout inside model loading."""
    from huggingface_hub import try_to_load_from_cache

    from ..ground import hub

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    what = (f"key 'model.base': {name!r} is not a local folder, so it was read as a Hugging Face hub id, and it "
            f"is not in the local cache")
    if hub.offline():
        raise ConfigError(f"{what}: HF_HUB_OFFLINE is set. Download it where there is network and pass its folder")
    hub.check_repo(name, "model", what, ConfigError)


def check_runtime(cfg: Config, world_size: int):
    """Checks that need the launch environment; run on every rank before any model loads (what each
    stage reads is its own check: stages.Stages.check)."""
    if cfg.monitor.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("key 'monitor.wandb': wandb is not installed (pip install wandb)") from None
    base = cfg.model.base  # every stage loads it: the frozen decoder
    if base != "tiny" and looks_local(base) and not os.path.exists(os.path.expanduser(base)):
        raise ConfigError(f"key 'model.base': no such file or folder {base}")
    if base != "tiny" and not os.path.isdir(base):
        _check_hub_model(base)
    for name in ("stage1", "stage2"):
        o = getattr(cfg, name)
        product = o.micro_batch_size * o.gradient_accumulation_steps * world_size
        if o.global_batch_size is not None and o.global_batch_size != product:
            raise ConfigError(
                f"key '{name}.global_batch_size' = {o.global_batch_size} but micro_batch_size x "
                f"gradient_accumulation_steps x world size = {o.micro_batch_size} x "
                f"{o.gradient_accumulation_steps} x {world_size} = {product}")
