"""Every stage of a run, declared once as an object: what it reads, what it writes, what it checks
before any model loads, and how it runs.

``PIPELINE`` is the one list: the run modes (``stage: <name>``), ``stage: pipeline``'s order,
the up-front checks, the plot's panels, ``autoregembed stages`` and the Slurm chain
(slurm/pipeline.sh) all derive from it.  A new stage is a class here and an entry in
``PIPELINE``; the machinery it runs on (DeepSpeed sessions, the training loop) is trainer.py's.

Why objects: each stage's inputs may be written by an earlier stage of the same run (the mined
rows, the stage-1 export), so the up-front checks must know which stage writes what.
"""
from __future__ import annotations

import dataclasses
import os

from ..ground import distributed as D
from . import preemption
from ..ground.atomic import atomic_write_text
from ..method.batches import candidate_batch, compression_batch, limit_negatives, with_in_batch_negatives
from .checkpoint import complete_tags
from .config import Config, ConfigError, OptimConfig, SourceConfig, looks_local
from ..ground.errors import UserError
from ..ground.data import (SourceRows, load_rows, load_sources, read_text, realised_shares, row_key, sampler_for,
                   write_jsonl)
from .diagnostics import information_gap
from .loading import prepare_base
from ..release.meta import META_FILE, ExportMeta
from ..method.losses import CompressionLoss
from ..ground.monitor import log
from .trainer import StageResult, evaluate, export_stage, score_references, train_stage


class Stage:
    """A step of a run.  ``run`` returns a trainer.StageResult; ``needs`` and ``writes`` let the
    pipeline check, before any model loads, every input that no earlier stage of the run writes."""

    name: str = ""
    trains = False  # saves checkpoints, can stop mid-stage on a stop request, continues with --resume
    data = 0  # which user sources it reads rows from (cfg.sources): 1, 2, or 0 for none

    def in_pipeline(self, cfg: Config) -> bool:
        """Whether ``stage: pipeline`` runs it."""
        return True

    def settings(self, cfg: Config) -> OptimConfig | None:
        """The batch and optimiser settings of the DeepSpeed engine it builds (None: it builds none)."""
        return None

    def needs(self, cfg: Config) -> dict[str, str]:
        """Files and folders it reads, by the config key that names them."""
        return {}

    def writes(self, cfg: Config) -> list[str]:
        """The files and folders it produces (a later stage's ``needs`` may name them)."""
        return []

    def sources(self, cfg: Config) -> list[SourceConfig]:
        """The datasets its rows come from."""
        return cfg.sources(self.data) if self.data else []

    def check_rows(self, cfg: Config):
        """Read and validate its rows (file:line:field errors) before any model loads."""

    def check(self, cfg: Config, earlier: list[str]):
        """Up-front checks; ``earlier``: what the stages before it in this run write, and the sources
        they have already validated (rows are read once, however many stages read them)."""
        for key, path in self.needs(cfg).items():
            if path in earlier:
                continue
            if path and looks_local(path) and not os.path.exists(os.path.expanduser(path)):
                raise ConfigError(self.missing(key, path))
        if not any(s.path in earlier for s in self.sources(cfg)):
            self.check_rows(cfg)

    def missing(self, key: str, path: str) -> str:
        """The message for an input that is not there."""
        return f"key '{key}': no such file or folder {path}"

    def run(self, cfg: Config, ds_path, resume: bool) -> StageResult:
        raise NotImplementedError

    def on_rank0(self, cfg: Config, work) -> StageResult:
        """``work()`` (returning a StageResult) on rank 0 while the others wait, stopped at once by a stop
        request: such a stage saves nothing, and reruns after the requeue (preemption.on_rank0)."""
        stopped, result = preemption.on_rank0(cfg.stage_dir(self.name), work)
        if not stopped:
            return result if D.rank() == 0 else StageResult("done")
        preemption.honoured(cfg.stage_dir(self.name), self.name)
        log(f"{self.name}: stop requested; exiting for requeue (the stage reruns)")
        return StageResult("preempted")


def _source_keys(cfg: Config, n: int) -> dict[str, str]:
    listed = isinstance(getattr(cfg.data, f"stage{n}"), list)
    return {f"data.stage{n}" + (f"[{i}]" if listed else ""): s.path for i, s in enumerate(cfg.sources(n))}


class TrainingStage(Stage):
    """A stage that trains the encoder: rows -> typed batch (batches.py) -> engine -> loss, the loop
    of trainer.train_stage, exported to ``<output_dir>/<name>/model`` at the end."""

    trains = True
    rescales_norm = False  # the final-norm calibration before training (decoder_scale.py)
    fits_shared_prefix = False  # with model.shared_prefix, its fit before training (shared_prefix.py)
    forms_pairs = False  # its micro-batches get in-batch negatives (data.in_batch_negatives): step_rows
    probe = None  # (engine, batches) -> extra metrics at every logged step, without gradient (diagnostics.py)

    def settings(self, cfg: Config) -> OptimConfig:
        """Micro-batch size, optimiser, schedule, checkpoints: its own config section."""
        return getattr(cfg, self.name)

    def input_model(self, cfg: Config) -> str:
        """The encoder it starts from."""
        raise NotImplementedError

    def rows(self, cfg: Config) -> SourceRows:
        return load_sources(self.sources(cfg), stage=self.data)

    def check_rows(self, cfg: Config):
        self.rows(cfg)

    def make_batch(self, cfg: Config, rows: list[dict], text_encoder, references):
        raise NotImplementedError

    def loss(self, cfg: Config):
        raise NotImplementedError

    def loss_settings(self, cfg: Config) -> dict:
        """What the model card says about its loss."""
        return {}

    def reference_source(self, cfg: Config) -> str | None:
        """Where the stage-1 reference values its batches carry come from ("file", "online"); None: it reads none."""
        return None

    def writes(self, cfg: Config) -> list[str]:
        return [cfg.export_dir(self.name)]

    def sampler(self, cfg: Config, rows: SourceRows):
        """Which rows each rank reads at each step (data.sampler_for): a pure function of the seed,
        the step, the batch settings, the sources' sizes and weights and the number of ranks."""
        o, sources = self.settings(cfg), self.sources(cfg)
        weights = None if sources[0].weight is None else [s.weight for s in sources]
        return sampler_for(getattr(rows, "sizes", (len(rows),)), weights, o.micro_batch_size,
                           o.gradient_accumulation_steps, D.world_size(), cfg.seed, cfg.data.same_source_batches)

    def mixture(self, cfg: Config, rows: SourceRows) -> str | None:
        """Each source's configured share and its share of the rows the run will read (its steps, every
        rank), when the stage reads several: what a mixture's weights turned into."""
        sources = self.sources(cfg)
        if len(sources) < 2:
            return None
        sizes = getattr(rows, "sizes", (len(rows),))
        weights = sizes if sources[0].weight is None else [s.weight for s in sources]
        read = realised_shares(self.sampler(cfg, rows), self.settings(cfg).max_steps)
        return "; ".join(f"{os.path.basename(s.path)} ({n:,} rows) {w / sum(weights):.1%} configured, {r:.1%} read"
                         for s, n, w, r in zip(sources, sizes, weights, read))

    def step_rows(self, cfg: Config, rows: list[dict], order, step: int, micro: int, rank: int) -> list[dict]:
        """The rows ``rank`` reads at (step, micro), with their in-batch negatives when the stage forms
        pairs and ``data.in_batch_negatives``: from its own micro-batch, or with
        ``data.cross_device_negatives`` from every rank's (the sampler gives each rank all of them)."""
        mine = [rows[i] for i in order.indices(step, micro, rank)]
        if not (self.forms_pairs and cfg.data.in_batch_negatives):
            return mine
        if not cfg.data.cross_device_negatives:
            return with_in_batch_negatives(mine)
        return with_in_batch_negatives(mine, [rows[i] for r in range(D.world_size())
                                              for i in order.indices(step, micro, r)])

    def run(self, cfg: Config, ds_path, resume: bool) -> StageResult:
        return train_stage(cfg, self, ds_path, resume)


class Stage1(TrainingStage):
    """Information compression: the frozen decoder reconstructs each target from e_1..e_k."""

    name, data = "stage1", 1
    rescales_norm = fits_shared_prefix = True
    probe = staticmethod(information_gap)

    def input_model(self, cfg):
        return prepare_base(cfg)

    def needs(self, cfg):
        return _source_keys(cfg, 1)

    def writes(self, cfg):
        tiny = [cfg.base_model_dir] if cfg.model.base == "tiny" else []  # prepare_base builds it on first use
        return super().writes(cfg) + tiny

    def make_batch(self, cfg, rows, text_encoder, references):
        return compression_batch(rows, text_encoder, cfg.loss.stage1_contrast > 0)

    def loss(self, cfg):
        return CompressionLoss(cfg.loss.stage1_contrast)


class Stage2Rows:
    """What reads the stage-2 rows (mine, reference, stage 2): the user's sources, or with
    ``mine.enabled`` the mined copies of them (one file per source, weights kept)."""

    data = 2

    def sources(self, cfg: Config) -> list[SourceConfig]:
        if not cfg.mine.enabled:
            return cfg.sources(2)
        return [SourceConfig(path=path, weight=s.weight, document_instruction=s.document_instruction)
                for s, path in zip(cfg.sources(2), MINE.outputs(cfg))]

    def stage2_rows(self, cfg: Config) -> SourceRows:
        rows = load_sources(self.sources(cfg), stage=2)
        return SourceRows([limit_negatives(r, cfg.data.max_negatives) for r in rows], rows.sizes)

    def needs(self, cfg: Config) -> dict[str, str]:
        if not cfg.mine.enabled:
            return _source_keys(cfg, 2)
        return {f"the mined rows of {s.path} (mine.enabled)": path
                for s, path in zip(cfg.sources(2), MINE.outputs(cfg))}

    def missing(self, key, path):
        if "mine.enabled" in key:
            return f"{key}: no such file {path}; run stage=mine first (or set mine.enabled=false)"
        return super().missing(key, path)


class NeedsStage1:
    """A stage that starts from the stage-1 export."""

    reads_decoder = True  # scores with the frozen decoder, which must read what it read in stage 1

    def needs_stage1(self, cfg: Config) -> dict[str, str]:
        return {"paths.stage1_model": cfg.stage1_model_dir}

    def check(self, cfg: Config, earlier: list[str]):
        """Also: the decoder reads its BOS (model.decoder_bos) as it did when the stage-1 export was
        trained; otherwise every score would be of an input stage 1 never saw."""
        super().check(cfg, earlier)
        path = cfg.stage1_model_dir
        if self.reads_decoder and path not in earlier and os.path.isfile(os.path.join(path, META_FILE)):
            trained = ExportMeta.read(path).decoder_bos
            if trained != cfg.model.decoder_bos:
                raise ConfigError(f"key 'model.decoder_bos': the stage-1 model {path} was trained with "
                                  f"model.decoder_bos={str(trained).lower()}; set it the same here (stage 1, "
                                  f"reference scores and stage 2 must agree)")

    def missing(self, key, path):
        if key == "paths.stage1_model":
            return (f"key 'paths.stage1_model': no stage-1 export at {path}; run stage1 first or point "
                    f"paths.stage1_model at one")
        return super().missing(key, path)


class Mine(NeedsStage1, Stage2Rows, Stage):
    """Hard negatives for the stage-2 rows, mined with the stage-1 model (optional: mine.enabled).

    For each source, its rows with their negatives replaced by the passages of the source most similar
    to the query (release/mining.py), written to ``<output_dir>/mine/`` beside a ``.fingerprint`` of what it was
    mined from (a resumed run keeps a file whose fingerprint still holds); reference scores and stage 2
    then read the mined rows.  Rank 0 mines, the other ranks wait (a barrier: mind the process group's
    timeout with a large corpus)."""

    name = "mine"
    reads_decoder = False  # it embeds with the encoder alone

    def in_pipeline(self, cfg):
        return cfg.mine.enabled

    def outputs(self, cfg: Config) -> list[str]:
        return [os.path.join(cfg.stage_dir(self.name), f"{i}-{os.path.basename(os.path.normpath(s.path))}"
                             + ("" if s.path.endswith(".jsonl") else ".jsonl"))
                for i, s in enumerate(cfg.sources(2))]

    def needs(self, cfg):
        return {**self.needs_stage1(cfg), **_source_keys(cfg, 2)}

    def sources(self, cfg):
        return cfg.sources(2)  # what it reads is the user's rows, whatever mine.enabled says

    def writes(self, cfg):
        return self.outputs(cfg)

    def check_rows(self, cfg):
        for s in cfg.sources(2):
            load_rows(s, stage=2)

    def run(self, cfg, ds_path, resume):
        from ..release.encoder import Encoder
        from ..release.mining import default_corpus, mine_negatives, mining_fingerprint

        outputs = self.outputs(cfg)

        def mine():
            m, encoder = cfg.mine, None
            settings = {**dataclasses.asdict(m), "enabled": True, **({"seed": cfg.seed} if m.sampling == "random" else {})}
            for source, path in zip(cfg.sources(2), outputs):
                rows = load_rows(source, stage=2)
                fp, stamp = mining_fingerprint(cfg.stage1_model_dir, rows, settings), path + ".fingerprint"
                if resume and os.path.exists(path) and os.path.exists(stamp) and read_text(stamp) == fp:
                    log(f"mine: {path} was mined from these rows with this model and settings; kept")
                    continue
                encoder = encoder or Encoder.from_pretrained(cfg.stage1_model_dir, device=D.device())
                mined = mine_negatives(encoder, rows, default_corpus(rows), m.negatives, m.skip_top,
                                       m.max_similarity, m.batch_size, show_progress_bar="mine: encoding",
                                       range_max=m.range_max, absolute_margin=m.absolute_margin,
                                       relative_margin=m.relative_margin, sampling=m.sampling, seed=cfg.seed,
                                       index=m.index, index_lists=m.index_lists, index_probe=m.index_probe)
                write_jsonl(path, mined)
                atomic_write_text(stamp, fp)  # after the rows: a stamp never vouches for a file not yet written
                log(f"mine: {len(mined)} of {len(rows)} rows of {source.path} with {m.negatives} mined "
                    f"negatives each -> {path}")
            return StageResult("done", ",".join(outputs))

        result = self.on_rank0(cfg, mine)
        return StageResult("done", ",".join(outputs)) if result.status == "done" else result


class Reference(NeedsStage1, Stage2Rows, Stage):
    """Reference scores of every stage-2 row by the stage-1 model, into a file keyed by row content.

    Not run with ``reference.source: online`` (stage 2 then scores them itself), nor for an objective
    that reads none (``loss.kind: infonce``)."""

    name = "reference"

    def in_pipeline(self, cfg):
        return STAGE2.reference_source(cfg) == "file"

    def settings(self, cfg):
        """Its engine's batch settings: ``reference.micro_batch_size`` rows per call (null: stage 2's);
        it never steps, so nothing else of stage 2's section applies."""
        micro = cfg.reference.micro_batch_size or cfg.stage2.micro_batch_size
        return OptimConfig(micro_batch_size=micro, max_steps=1)

    def input_model(self, cfg):
        return cfg.stage1_model_dir

    def needs(self, cfg):
        return {**self.needs_stage1(cfg), **super().needs(cfg)}

    def writes(self, cfg):
        return [cfg.reference_scores_path]

    def rows(self, cfg):
        """The stage-2 rows as stage 2's batches will hold them (``scheduled_rows``)."""
        return scheduled_rows(cfg, self.stage2_rows(cfg))

    def check_rows(self, cfg):
        self.stage2_rows(cfg)

    def make_batch(self, cfg, rows, text_encoder, references):
        return candidate_batch(rows, text_encoder)

    def run(self, cfg, ds_path, resume):
        return score_references(cfg, self, ds_path, resume)


class Stage2(NeedsStage1, Stage2Rows, TrainingStage):
    """Conditional distribution alignment, from the stage-1 model (its objective: loss.kind).

    ``loss.kind`` names a class of losses.STAGE2_OBJECTIVES, ``alignment`` (losses.AlignmentLoss) by default."""

    name = "stage2"
    forms_pairs = True

    def input_model(self, cfg):
        return cfg.stage1_model_dir

    def rows(self, cfg):
        return self.stage2_rows(cfg)

    def needs(self, cfg):
        refs = {"paths.reference_scores": cfg.reference_scores_path} if self.reference_source(cfg) == "file" else {}
        return {**self.needs_stage1(cfg), **super().needs(cfg), **refs}

    def missing(self, key, path):
        if key == "paths.reference_scores":
            return (f"key 'paths.reference_scores': no reference scores at {path}; run stage=reference first "
                    f"(or set reference.source=online)")
        return super().missing(key, path)

    def reference_rows(self, cfg: Config, rows: list[dict]) -> list[dict]:
        """The rows, as its batches will hold them, that the reference file must cover."""
        return scheduled_rows(cfg, rows)

    def reference_source(self, cfg):
        return cfg.reference.source if cfg.loss.objective.needs_references else None

    def make_batch(self, cfg, rows, text_encoder, references):
        return cfg.loss.objective.batch(rows, text_encoder, references)  # the batch loss.kind reads

    def loss(self, cfg):
        return cfg.loss.objective  # loss.kind's class, built by the config loader

    def loss_settings(self, cfg):
        return {"kind": cfg.loss.kind, **dataclasses.asdict(cfg.loss.objective), "references": self.reference_source(cfg),
                "in_batch_negatives": cfg.data.in_batch_negatives,
                "cross_device_negatives": cfg.data.cross_device_negatives}


def export_source(cfg: Config) -> str:
    """``paths.export_from``: the training stage whose checkpoint or export ``export`` and ``eval`` read."""
    if cfg.paths.export_from not in TRAINING:
        raise ConfigError(f"key 'paths.export_from': {cfg.paths.export_from!r} is not one of {', '.join(TRAINING)}")
    return cfg.paths.export_from


class Export(Stage):
    """The latest checkpoint of paths.export_from, consolidated into its export folder.

    Training stages export at their end; this is for a checkpoint a stop or a crash left behind."""

    name = "export"

    def in_pipeline(self, cfg):
        return False

    def check(self, cfg, earlier):
        source = export_source(cfg)
        if not complete_tags(cfg.checkpoint_dir(source)):
            raise ConfigError(f"key 'paths.export_from' = {source}: no complete checkpoint in "
                              f"{cfg.checkpoint_dir(source)}; train {source} into this output_dir first")
        super().check(cfg, earlier)

    def needs(self, cfg):  # a stage-2 session is built on the stage-1 export (its shared prefix, its tokenizer)
        return STAGE2.needs_stage1(cfg) if export_source(cfg) == STAGE2.name else {}

    def missing(self, key, path):
        return STAGE2.missing(key, path)

    def writes(self, cfg):
        return [cfg.export_dir(cfg.paths.export_from)]

    def run(self, cfg, ds_path, resume):
        return export_stage(cfg, STAGES[export_source(cfg)], ds_path)


class Eval(Stage):
    """STS Spearman of the run's export on eval.sts_file and its retrieval on eval.retrieval, beside the
    untrained base's (eval.compare_base).

    Stage 2's export in a pipeline, else ``paths.export_from``'s; written to
    ``<output_dir>/eval/result.json`` and the export's model card."""

    name = "eval"

    def model_dir(self, cfg: Config) -> str:
        return cfg.export_dir(STAGE2.name if cfg.is_pipeline else export_source(cfg))

    def needs(self, cfg):
        base = {"model.base (the floor of eval.compare_base)": cfg.base_model_dir} if cfg.eval.compare_base else {}
        retrieval = {"eval.retrieval": cfg.retrieval_set} if cfg.retrieval_set else {}
        return {"eval.sts_file": cfg.sts_file, **retrieval, **base}

    def check(self, cfg, earlier):
        model = self.model_dir(cfg)
        if model not in earlier and not os.path.isfile(os.path.join(model, "autoregembed.json")):
            raise ConfigError(f"key 'paths.export_from' = {cfg.paths.export_from}: no export at {model} to "
                              f"evaluate; run stage={cfg.paths.export_from} (or stage=export) into this "
                              f"output_dir first")
        super().check(cfg, earlier)
        from ..release import retrieval
        from ..release.evaluate import read_sts

        # read whole before any model loads: a bad line must not surface after hours of training
        for key, read, path in (("eval.sts_file", read_sts, cfg.sts_file),
                                ("eval.retrieval", retrieval.load, cfg.retrieval_set)):
            try:
                if path:
                    read(path)
            except UserError as e:
                raise ConfigError(f"key '{key}': {e}") from None

    def run(self, cfg, ds_path, resume):
        return self.on_rank0(cfg, lambda: StageResult("done",
                                                      score=evaluate(cfg, self.model_dir(cfg))["spearman_x100"]))


STAGE1, MINE, REFERENCE, STAGE2, EXPORT, EVAL = Stage1(), Mine(), Reference(), Stage2(), Export(), Eval()
PIPELINE = (STAGE1, MINE, REFERENCE, STAGE2, EXPORT, EVAL)  # the order in which a pipeline runs them
STAGES = {s.name: s for s in PIPELINE}
TRAINING = tuple(s.name for s in PIPELINE if s.trains)
RUN_MODES = (*STAGES, "pipeline")  # the values of `stage`


def planned(cfg: Config) -> list[Stage]:
    """What ``stage`` runs, in order: one stage, or every stage of ``PIPELINE`` that is in the pipeline."""
    if cfg.stage == "pipeline":
        return [s for s in PIPELINE if s.in_pipeline(cfg)]
    if cfg.stage not in STAGES:
        raise ConfigError(f"key 'stage': {cfg.stage!r} is not one of {', '.join(RUN_MODES)}")
    return [STAGES[cfg.stage]]


def check_stages(cfg: Config) -> list[Stage]:
    """Every planned stage's up-front checks, each skipping what an earlier stage of the run writes
    or has already validated (reference scoring and stage 2 read the same stage-2 rows)."""
    stages, earlier = planned(cfg), []
    for stage in stages:
        stage.check(cfg, earlier)
        earlier += stage.writes(cfg) + [s.path for s in stage.sources(cfg)]
    return stages


def scheduled_rows(cfg: Config, rows: list[dict]) -> list[dict]:
    """The stage-2 rows as its batches will hold them: the rows themselves, or with
    ``data.in_batch_negatives`` every micro-batch of its schedule (a pure function of the seed, the
    step, the batch settings and the number of ranks: data.StepSampler) with its in-batch negatives,
    each distinct row once.  What the reference stage scores and stage 2 looks up."""
    if not cfg.data.in_batch_negatives:
        return rows
    o = cfg.stage2
    order = STAGE2.sampler(cfg, rows)
    out = {}
    for step in range(o.max_steps):
        for micro in range(o.gradient_accumulation_steps):
            for rank in range(D.world_size()):
                for row in STAGE2.step_rows(cfg, rows, order, step, micro, rank):
                    out.setdefault(row_key(row), row)
    return list(out.values())
