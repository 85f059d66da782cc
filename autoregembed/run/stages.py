"""Every stage of a run as an object bound to its own settings: what it reads, what it writes, what it
checks before any model loads, and how it runs.

``PIPELINE`` is the one list of stage classes: the run modes (``stage: <name>``), ``stage: pipeline``'s
order, the plot's panels, ``autoregembed stages`` and the Slurm chain (slurm/pipeline.sh) derive from it.
``stages_for(cfg)`` is the one place here that reads the whole Config: it hands each stage its own section,
the few run-wide values it needs (the layout, the seed) and the parts it shares with others (the stage-2
rows, the stage-1 export), so no stage reaches into another through globals.  A new stage is a class here,
an entry in ``PIPELINE`` and a line in ``stages_for``; the machinery it runs on (DeepSpeed sessions, the
training loop) is trainer.py's.

Why objects: each stage's inputs may be written by an earlier stage of the same run (the mined rows,
the stage-1 export), so the up-front checks must know which stage writes what.
"""
from __future__ import annotations

import dataclasses
import os

from ..ground import distributed as D
from . import preemption
from ..ground.atomic import atomic_write_text
from ..method.batches import candidate_batch, limit_negatives, with_in_batch_negatives
from .checkpoint import complete_tags
from .config import (Config, ConfigError, DataConfig, EvalConfig, LossConfig, MineConfig, OptimConfig, SourceConfig,
                     StageOneLossConfig, looks_local)
from ..ground.errors import UserError
from ..ground.data import (SourceRows, load_rows, load_sources, read_text, realised_shares, row_key, sampler_for,
                           write_jsonl)
from .diagnostics import information_gap
from .layout import Layout
from ..release.meta import META_FILE, ExportMeta
from ..ground.monitor import log
from .evaluation import evaluate
from .scoring import score_references
from .session import RunContext
from .sharded_encoding import ShardedEncoder
from .trainer import StageResult, export_stage, train_stage


@dataclasses.dataclass(frozen=True)
class UserSources:
    """The datasets one data key names (``data.stage1`` or ``data.stage2``: one file or a list)."""

    key: str
    sources: tuple[SourceConfig, ...]
    listed: bool  # a list in the config: its entries are named key[i]

    def keys(self) -> dict[str, str]:
        """Each source's path by the config key that names it."""
        return {self.key + (f"[{i}]" if self.listed else ""): s.path for i, s in enumerate(self.sources)}


class Stage2Rows:
    """The stage-2 rows that mine, reference and stage 2 read: the user's sources, or with
    ``mine.enabled`` the mined copies of them (``mined``: one file per source, weights kept)."""

    def __init__(self, user: UserSources, mined: list[str] | None, max_negatives: int | None):
        self.user, self.mined, self.max_negatives = user, mined, max_negatives

    def sources(self) -> list[SourceConfig]:
        if self.mined is None:
            return list(self.user.sources)
        return [SourceConfig(path=path, weight=s.weight, document_instruction=s.document_instruction)
                for s, path in zip(self.user.sources, self.mined)]

    def load(self) -> SourceRows:
        rows = load_sources(self.sources(), stage=2)
        return SourceRows([limit_negatives(r, self.max_negatives) for r in rows], rows.sizes)

    def needs(self) -> dict[str, str]:
        if self.mined is None:
            return self.user.keys()
        return {f"the mined rows of {s.path} (mine.enabled)": path for s, path in zip(self.user.sources, self.mined)}

    @staticmethod
    def missing(key: str, path: str) -> str | None:
        if "mine.enabled" in key:
            return f"{key}: no such file {path}; run stage=mine first (or set mine.enabled=false)"
        return None


@dataclasses.dataclass(frozen=True)
class Stage1Export:
    """The stage-1 export a later stage starts from (``paths.stage1_model``), and the decoder BOS it was
    trained with."""

    path: str
    decoder_bos: bool  # model.decoder_bos of this run

    def needs(self) -> dict[str, str]:
        return {"paths.stage1_model": self.path}

    def check(self, earlier: list[str]):
        """For a stage that scores with the frozen decoder: it reads its BOS (model.decoder_bos) as it did
        when the export was trained; otherwise every score would be of an input stage 1 never saw."""
        if self.path not in earlier and os.path.isfile(os.path.join(self.path, META_FILE)):
            trained = ExportMeta.read(self.path).decoder_bos
            if trained != self.decoder_bos:
                raise ConfigError(f"key 'model.decoder_bos': the stage-1 model {self.path} was trained with "
                                  f"model.decoder_bos={str(trained).lower()}; set it the same here (stage 1, "
                                  f"reference scores and stage 2 must agree)")

    @staticmethod
    def missing(key: str, path: str) -> str | None:
        if key == "paths.stage1_model":
            return (f"key 'paths.stage1_model': no stage-1 export at {path}; run stage1 first or point "
                    f"paths.stage1_model at one")
        return None


class Stage:
    """A step of a run.  ``run`` returns a trainer.StageResult; ``needs`` and ``writes`` let the
    pipeline check, before any model loads, every input that no earlier stage of the run writes."""

    name: str = ""
    trains = False  # saves checkpoints, can stop mid-stage on a stop request, continues with --resume

    def __init__(self, layout: Layout):
        self.layout = layout

    @property
    def dir(self) -> str:
        """Its folder under the output folder."""
        return self.layout.stage_dir(self.name)

    def in_pipeline(self) -> bool:
        """Whether ``stage: pipeline`` runs it."""
        return True

    def settings(self) -> OptimConfig | None:
        """The batch and optimiser settings of the DeepSpeed engine it builds (None: it builds none)."""
        return None

    def reads_decoder(self) -> bool:
        """Whether its engine scores with the frozen decoder (false: the decoder is not loaded)."""
        return True

    def needs(self) -> dict[str, str]:
        """Files and folders it reads, by the config key that names them."""
        return {}

    def writes(self) -> list[str]:
        """The files and folders it produces (a later stage's ``needs`` may name them)."""
        return []

    def sources(self) -> list[SourceConfig]:
        """The datasets its rows come from."""
        return []

    def check_rows(self):
        """Read and validate its rows (file:line:field errors) before any model loads."""

    def check(self, earlier: list[str]):
        """Up-front checks; ``earlier``: what the stages before it in this run write, and the sources
        they have already validated (rows are read once, however many stages read them)."""
        for key, path in self.needs().items():
            if path in earlier:
                continue
            if path and looks_local(path) and not os.path.exists(os.path.expanduser(path)):
                raise ConfigError(self.missing(key, path))
        if not any(s.path in earlier for s in self.sources()):
            self.check_rows()

    def missing(self, key: str, path: str) -> str:
        """The message for an input that is not there."""
        return (Stage1Export.missing(key, path) or Stage2Rows.missing(key, path)
                or f"key '{key}': no such file or folder {path}")

    def run(self, ctx: RunContext, resume: bool) -> StageResult:
        raise NotImplementedError

    def on_rank0(self, work) -> StageResult:
        """``work()`` (returning a StageResult) on rank 0 while the others wait, stopped at once by a stop
        request: such a stage saves nothing, and reruns after the requeue (preemption.on_rank0)."""
        stopped, result = preemption.on_rank0(self.dir, work)
        if not stopped:
            return result if D.rank() == 0 else StageResult("done")
        return self.preempted()

    def preempted(self) -> StageResult:
        """A stop request honoured by a stage that saves nothing: it reruns after the requeue."""
        preemption.honoured(self.dir, self.name)
        log(f"{self.name}: stop requested; exiting for requeue (the stage reruns)")
        return StageResult("preempted")


class TrainingStage(Stage):
    """A stage that trains the encoder: rows -> typed batch (batches.py) -> engine -> loss, the loop
    of trainer.train_stage, exported to ``<output_dir>/<name>/model`` at the end.

    Bound to its own section (``optim``: stage1 or stage2), the data section (batching choices) and the
    run's seed (the sampler's)."""

    trains = True
    rescales_norm = False  # the final-norm calibration before training (decoder_scale.py)
    fits_shared_prefix = False  # with model.shared_prefix, its fit before training (shared_prefix.py)
    forms_pairs = False  # its micro-batches get in-batch negatives (data.in_batch_negatives): step_rows
    probe = None  # (engine, batches) -> extra metrics at every logged step, without gradient (diagnostics.py)

    def __init__(self, layout: Layout, optim: OptimConfig, data: DataConfig, seed: int):
        super().__init__(layout)
        self.optim, self.data, self.seed = optim, data, seed

    def settings(self) -> OptimConfig:
        """Micro-batch size, optimiser, schedule, checkpoints: its own config section."""
        return self.optim

    def input_model(self, ctx: RunContext) -> str:
        """The encoder it starts from."""
        raise NotImplementedError

    def session_needs(self) -> dict[str, str]:
        """What a session of it reads besides its rows and checkpoints (``export`` checks these)."""
        return {}

    def rows(self) -> SourceRows:
        raise NotImplementedError

    def check_rows(self):
        self.rows()

    def make_batch(self, rows: list[dict], text_encoder, references):
        raise NotImplementedError

    def loss(self):
        raise NotImplementedError

    def loss_settings(self) -> dict:
        """What the model card says about its loss."""
        return {}

    def reference_source(self) -> str | None:
        """Where the stage-1 reference values its batches carry come from ("file", "online"); None: it reads none."""
        return None

    def writes(self) -> list[str]:
        return [self.layout.export_dir(self.name)]

    def sampler(self, rows: SourceRows):
        """Which rows each rank reads at each step (data.sampler_for): a pure function of the seed,
        the step, the batch settings, the sources' sizes and weights and the number of ranks."""
        o, sources = self.optim, self.sources()
        weights = None if sources[0].weight is None else [s.weight for s in sources]
        return sampler_for(getattr(rows, "sizes", (len(rows),)), weights, o.micro_batch_size,
                           o.gradient_accumulation_steps, D.world_size(), self.seed, self.data.same_source_batches)

    def mixture(self, rows: SourceRows) -> str | None:
        """Each source's configured share and its share of the rows the run will read (its steps, every
        rank), when the stage reads several: what a mixture's weights turned into."""
        sources = self.sources()
        if len(sources) < 2:
            return None
        sizes = getattr(rows, "sizes", (len(rows),))
        weights = sizes if sources[0].weight is None else [s.weight for s in sources]
        read = realised_shares(self.sampler(rows), self.optim.max_steps)
        return "; ".join(f"{os.path.basename(s.path)} ({n:,} rows) {w / sum(weights):.1%} configured, {r:.1%} read"
                         for s, n, w, r in zip(sources, sizes, weights, read))

    def step_rows(self, rows: list[dict], order, step: int, micro: int, rank: int) -> list[dict]:
        """The rows ``rank`` reads at (step, micro), with their in-batch negatives when the stage forms
        pairs and ``data.in_batch_negatives``: from its own micro-batch, or with
        ``data.cross_device_negatives`` from every rank's (the sampler gives each rank all of them)."""
        mine = [rows[i] for i in order.indices(step, micro, rank)]
        if not (self.forms_pairs and self.data.in_batch_negatives):
            return mine
        if not self.data.cross_device_negatives:
            return with_in_batch_negatives(mine)
        return with_in_batch_negatives(mine, [rows[i] for r in range(D.world_size())
                                              for i in order.indices(step, micro, r)])

    def run(self, ctx: RunContext, resume: bool) -> StageResult:
        return train_stage(ctx, self, resume)


class Stage1(TrainingStage):
    """Information compression: the frozen decoder reconstructs each target from e_1..e_k."""

    name = "stage1"
    rescales_norm = fits_shared_prefix = True
    probe = staticmethod(information_gap)

    def __init__(self, layout: Layout, optim: OptimConfig, data: DataConfig, seed: int, user: UserSources,
                 loss: StageOneLossConfig, builds_base: bool):
        super().__init__(layout, optim, data, seed)
        self.user, self.loss_config = user, loss
        self.builds_base = builds_base  # model.base: tiny, built on first use (RunContext.base)

    def input_model(self, ctx):
        return ctx.base()

    def sources(self):
        return list(self.user.sources)

    def needs(self):
        return self.user.keys()

    def writes(self):
        return super().writes() + ([self.layout.base_model] if self.builds_base else [])

    def rows(self):
        return load_sources(self.sources(), stage=1)

    def make_batch(self, rows, text_encoder, references):
        return self.loss_config.objective.batch(rows, text_encoder)  # the batch stage1_loss.kind reads

    def loss(self):
        return self.loss_config.objective  # stage1_loss.kind's class, built by the config loader

    def loss_settings(self):
        return {"kind": self.loss_config.kind, **dataclasses.asdict(self.loss_config.objective)}


class Stage2(TrainingStage):
    """Conditional distribution alignment, from the stage-1 model (its objective: loss.kind).

    ``loss.kind`` names a class of losses.STAGE2_OBJECTIVES, ``alignment`` (losses.AlignmentLoss) by default."""

    name = "stage2"
    forms_pairs = True

    def __init__(self, layout: Layout, optim: OptimConfig, data: DataConfig, seed: int, pairs: Stage2Rows,
                 stage1: Stage1Export, loss: LossConfig, references: str):
        super().__init__(layout, optim, data, seed)
        self.pairs, self.stage1, self.loss_config = pairs, stage1, loss
        self.references = references  # reference.source: file | online

    def input_model(self, ctx):
        return self.stage1.path

    def session_needs(self):  # a stage-2 session is built on the stage-1 export (its shared prefix, its tokenizer)
        return self.stage1.needs()

    def sources(self):
        return self.pairs.sources()

    def rows(self):
        return self.pairs.load()

    def needs(self):
        refs = {"paths.reference_scores": self.layout.reference_scores} if self.reference_source() == "file" else {}
        return {**self.stage1.needs(), **self.pairs.needs(), **refs}

    def check(self, earlier):
        super().check(earlier)
        self.stage1.check(earlier)

    def missing(self, key, path):
        if key == "paths.reference_scores":
            return (f"key 'paths.reference_scores': no reference scores at {path}; run stage=reference first "
                    f"(or set reference.source=online)")
        return super().missing(key, path)

    def scheduled_rows(self, rows: list[dict]) -> list[dict]:
        """The rows as its batches will hold them: the rows themselves, or with ``data.in_batch_negatives``
        every micro-batch of its schedule (a pure function of the seed, the step, the batch settings and
        the number of ranks: data.StepSampler) with its in-batch negatives, each distinct row once.  What
        the reference stage scores and the reference file must cover."""
        if not self.data.in_batch_negatives:
            return rows
        o, order, out = self.optim, self.sampler(rows), {}
        for step in range(o.max_steps):
            for micro in range(o.gradient_accumulation_steps):
                for rank in range(D.world_size()):
                    for row in self.step_rows(rows, order, step, micro, rank):
                        out.setdefault(row_key(row), row)
        return list(out.values())

    def reference_source(self):
        return self.references if self.loss_config.objective.needs_references else None

    def reads_decoder(self):
        return getattr(self.loss_config.objective, "reads_decoder", True)

    def make_batch(self, rows, text_encoder, references):
        return self.loss_config.objective.batch(rows, text_encoder, references)  # the batch loss.kind reads

    def loss(self):
        return self.loss_config.objective  # loss.kind's class, built by the config loader

    def loss_settings(self):
        return {"kind": self.loss_config.kind, **dataclasses.asdict(self.loss_config.objective),
                "references": self.reference_source(), "in_batch_negatives": self.data.in_batch_negatives,
                "cross_device_negatives": self.data.cross_device_negatives}


class Mine(Stage):
    """Hard negatives for the stage-2 rows, mined with the stage-1 model (optional: mine.enabled).

    For each source, its rows with their negatives replaced by the passages of the source most similar
    to the query (release/mining.py), written to ``<output_dir>/mine/`` beside a ``.fingerprint`` of what it was
    mined from (a resumed run keeps a file whose fingerprint still holds); reference scores and stage 2
    then read the mined rows.  Every rank encodes its share of the texts (sharded_encoding.py); rank 0
    selects the negatives and writes the file while the others wait."""

    name = "mine"

    def __init__(self, layout: Layout, settings: MineConfig, seed: int, user: UserSources, stage1: Stage1Export):
        super().__init__(layout)
        self.mine, self.seed, self.user, self.stage1 = settings, seed, user, stage1

    def in_pipeline(self):
        return self.mine.enabled

    def outputs(self) -> list[str]:
        """One mined file per user source, in order."""
        return [os.path.join(self.dir, f"{i}-{os.path.basename(os.path.normpath(s.path))}"
                             + ("" if s.path.endswith(".jsonl") else ".jsonl"))
                for i, s in enumerate(self.user.sources)]

    def needs(self):
        return {**self.stage1.needs(), **self.user.keys()}

    def sources(self):
        return list(self.user.sources)  # what it reads is the user's rows, whatever mine.enabled says

    def writes(self):
        return self.outputs()

    def check_rows(self):
        for s in self.user.sources:
            load_rows(s, stage=2)

    def run(self, ctx, resume):  # it embeds with the encoder alone: no decoder BOS to agree on
        from ..release.encoder import Encoder
        from ..release.mining import default_corpus, mining_embeddings, mining_fingerprint, select_negatives

        outputs, m, encoder = self.outputs(), self.mine, None
        settings = {**dataclasses.asdict(m), "enabled": True, **({"seed": self.seed} if m.sampling == "random" else {})}
        try:
            for source, path in zip(self.user.sources, outputs):
                rows = load_rows(source, stage=2)
                stamp = path + ".fingerprint"  # rank 0 hashes the model folder once, not every rank
                fp = mining_fingerprint(self.stage1.path, rows, settings) if D.rank() == 0 else None
                kept = D.rank() == 0 and resume and os.path.exists(path) and os.path.exists(stamp) \
                    and read_text(stamp) == fp
                if D.broadcast_object(kept):  # rank 0's reading decides for every rank
                    log(f"mine: {path} was mined from these rows with this model and settings; kept")
                    continue
                encoder = encoder or ShardedEncoder(Encoder.from_pretrained(self.stage1.path, device=D.device()),
                                                    self.dir)
                corpus = default_corpus(rows)
                embeddings = mining_embeddings(encoder, rows, corpus, m.batch_size, "mine: encoding")
                stopped, mined = preemption.on_rank0(self.dir, lambda: select_negatives(
                    rows, corpus, embeddings, m.negatives, m.skip_top, m.max_similarity, m.range_max,
                    m.absolute_margin, m.relative_margin, m.sampling, self.seed, m.index, m.index_lists,
                    m.index_probe))
                if stopped:
                    raise preemption.StopRequested
                if D.rank() == 0:
                    write_jsonl(path, mined)
                    atomic_write_text(stamp, fp)  # after the rows: a stamp never vouches for a file not yet written
                    log(f"mine: {len(mined)} of {len(rows)} rows of {source.path} with {m.negatives} mined "
                        f"negatives each -> {path}")
                D.barrier()
        except preemption.StopRequested:
            return self.preempted()
        return StageResult("done", ",".join(outputs))


class Reference(Stage):
    """Reference scores of every stage-2 row by the stage-1 model, into a file keyed by row content.

    Not run with ``reference.source: online`` (stage 2 then scores them itself), nor for an objective
    that reads none (``loss.kind: infonce``).  It scores what ``stage2`` will look up."""

    name = "reference"

    def __init__(self, layout: Layout, micro_batch_size: int | None, stage2: Stage2):
        super().__init__(layout)
        self.micro_batch_size, self.stage2 = micro_batch_size, stage2  # reference.micro_batch_size

    def in_pipeline(self):
        return self.stage2.reference_source() == "file"

    def settings(self):
        """Its engine's batch settings: ``reference.micro_batch_size`` rows per call (null: stage 2's);
        it never steps, so nothing else of stage 2's section applies."""
        return OptimConfig(micro_batch_size=self.micro_batch_size or self.stage2.optim.micro_batch_size, max_steps=1)

    def input_model(self, ctx: RunContext) -> str:
        return self.stage2.stage1.path

    def sources(self):
        return self.stage2.sources()

    def needs(self):
        return {**self.stage2.stage1.needs(), **self.stage2.pairs.needs()}

    def writes(self):
        return [self.layout.reference_scores]

    def rows(self) -> list[dict]:
        """The stage-2 rows as stage 2's batches will hold them (``Stage2.scheduled_rows``)."""
        return self.stage2.scheduled_rows(self.stage2.rows())

    def check_rows(self):
        self.stage2.rows()

    def check(self, earlier):
        super().check(earlier)
        self.stage2.stage1.check(earlier)

    def make_batch(self, rows, text_encoder, references):
        return candidate_batch(rows, text_encoder)

    def run(self, ctx, resume):
        return score_references(ctx, self, resume)


class Export(Stage):
    """The latest checkpoint of paths.export_from, consolidated into its export folder.

    Training stages export at their end; this is for a checkpoint a stop or a crash left behind."""

    name = "export"

    def __init__(self, layout: Layout, source: TrainingStage | None, export_from: str):
        super().__init__(layout)
        self.source_stage, self.export_from = source, export_from  # paths.export_from, and its stage (None: not one)

    def in_pipeline(self):
        return False

    def training(self) -> TrainingStage:
        """The training stage ``paths.export_from`` names."""
        if self.source_stage is None:
            raise ConfigError(f"key 'paths.export_from': {self.export_from!r} is not one of {', '.join(TRAINING)}")
        return self.source_stage

    def check(self, earlier):
        source = self.training()
        if not complete_tags(self.layout.checkpoint_dir(source.name)):
            raise ConfigError(f"key 'paths.export_from' = {source.name}: no complete checkpoint in "
                              f"{self.layout.checkpoint_dir(source.name)}; train {source.name} into this output_dir "
                              f"first")
        super().check(earlier)

    def needs(self):
        return self.training().session_needs()

    def writes(self):
        return [self.layout.export_dir(self.export_from)]

    def run(self, ctx, resume):
        return export_stage(ctx, self.training())


class Eval(Stage):
    """STS Spearman of the run's export on eval.sts_file and its retrieval on eval.retrieval, beside the
    untrained base's (eval.compare_base).

    Stage 2's export in a pipeline, else ``paths.export_from``'s (``export``: the Export stage that names
    it); written to ``<output_dir>/eval/result.json`` and the export's model card."""

    name = "eval"

    def __init__(self, layout: Layout, settings: EvalConfig, export: Export, pipeline: bool):
        super().__init__(layout)
        self.eval, self.export, self.pipeline = settings, export, pipeline

    def model_dir(self) -> str:
        return self.layout.export_dir(Stage2.name if self.pipeline else self.export.training().name)

    def needs(self):
        ev = self.eval
        base = {"model.base (the floor of eval.compare_base)": self.layout.base_model} if ev.compare_base else {}
        retrieval = {"eval.retrieval": ev.retrieval_path} if ev.retrieval_path else {}
        return {"eval.sts_file": ev.sts_path, **retrieval, **base}

    def check(self, earlier):
        model = self.model_dir()
        if model not in earlier and not os.path.isfile(os.path.join(model, "autoregembed.json")):
            source = self.export.export_from
            raise ConfigError(f"key 'paths.export_from' = {source}: no export at {model} to evaluate; run "
                              f"stage={source} (or stage=export) into this output_dir first")
        super().check(earlier)
        from ..release import retrieval
        from ..release.evaluate import read_sts

        # read whole before any model loads: a bad line must not surface after hours of training
        for key, read, path in (("eval.sts_file", read_sts, self.eval.sts_path),
                                ("eval.retrieval", retrieval.load, self.eval.retrieval_path)):
            try:
                if path:
                    read(path)
            except UserError as e:
                raise ConfigError(f"key '{key}': {e}") from None

    def start(self) -> str | None:
        """The stage-1 export a stage-2 export was trained from (eval.compare_stage1), when it is there."""
        if self.model_dir() != self.layout.export_dir(Stage2.name):
            return None
        start = self.layout.stage1_model
        return start if os.path.isfile(os.path.join(start, META_FILE)) else None

    def run(self, ctx, resume):
        return self.on_rank0(lambda: StageResult(
            "done", score=evaluate(self.eval, self.layout, self.model_dir(), self.start())["spearman_x100"]))


PIPELINE = (Stage1, Mine, Reference, Stage2, Export, Eval)  # the order in which a pipeline runs them
TRAINING = tuple(s.name for s in PIPELINE if s.trains)
RUN_MODES = (*(s.name for s in PIPELINE), "pipeline")  # the values of `stage`


class Stages:
    """The stages of one run, each bound to its settings (``stages_for``), in ``PIPELINE`` order."""

    def __init__(self, mode: str, stages: list[Stage]):
        self.mode, self.by_name = mode, {s.name: s for s in stages}

    def __getitem__(self, name: str) -> Stage:
        return self.by_name[name]

    def planned(self) -> list[Stage]:
        """What ``stage`` runs, in order: one stage, or every stage of ``PIPELINE`` that is in the pipeline."""
        if self.mode == "pipeline":
            return [s for s in self.by_name.values() if s.in_pipeline()]
        if self.mode not in self.by_name:
            raise ConfigError(f"key 'stage': {self.mode!r} is not one of {', '.join(RUN_MODES)}")
        return [self.by_name[self.mode]]

    def check(self) -> list[Stage]:
        """Every planned stage's up-front checks, each skipping what an earlier stage of the run writes
        or has already validated (reference scoring and stage 2 read the same stage-2 rows)."""
        stages, earlier = self.planned(), []
        for stage in stages:
            stage.check(earlier)
            earlier += stage.writes() + [s.path for s in stage.sources()]
        return stages


def stages_for(cfg: Config) -> Stages:
    """Every stage of ``PIPELINE``, each given its own section and what it shares with the others: the
    one reader of the whole Config on this floor."""
    layout, data = cfg.layout, cfg.data
    user = {n: UserSources(f"data.stage{n}", tuple(cfg.sources(n)), isinstance(getattr(data, f"stage{n}"), list))
            for n in (1, 2)}
    stage1_export = Stage1Export(layout.stage1_model, cfg.model.decoder_bos)
    stage1 = Stage1(layout, cfg.stage1, data, cfg.seed, user[1], cfg.stage1_loss, cfg.model.base == "tiny")
    mine = Mine(layout, cfg.mine, cfg.seed, user[2], stage1_export)
    pairs = Stage2Rows(user[2], mine.outputs() if cfg.mine.enabled else None, data.max_negatives)
    stage2 = Stage2(layout, cfg.stage2, data, cfg.seed, pairs, stage1_export, cfg.loss, cfg.reference.source)
    export = Export(layout, {s.name: s for s in (stage1, stage2)}.get(cfg.paths.export_from), cfg.paths.export_from)
    eval_ = Eval(layout, cfg.eval, export, cfg.is_pipeline)
    return Stages(cfg.stage, [stage1, mine, Reference(layout, cfg.reference.micro_batch_size, stage2), stage2, export,
                              eval_])
