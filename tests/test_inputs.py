"""Bad data and bad configuration fail early, naming file, line and field (or key)."""
import json
import os

import pytest
import torch
from helpers import ROOT, run_child

from autoregembed.run.config import ConfigError, check_runtime, load_config
from autoregembed.ground.data import DataError, StepSampler, load_rows
from autoregembed.run.ds_config import build_ds_config
from autoregembed.ground.arch import Arch
from autoregembed.release.evaluate import read_sts
from autoregembed.run.stages import stages_for

GOOD2 = {"query": "q", "pos": "p", "neg": ["n1", "n2"], "instruction": "i"}


def _write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("bad,pattern", [
    ('{"query": "q", "pos": "p", "instruction": "i"}', r":3: missing field 'neg'"),
    ('{"query": "  ", "pos": "p", "neg": "n", "instruction": "i"}', r":3: field 'query' is empty"),
    ('{"query": "q", "pos": "p", "neg": "n", "instruction": "i"', r":3: bad JSON"),
    ('{"query": 5, "pos": "p", "neg": "n", "instruction": "i"}', r":3: field 'query' must be a string, got int"),
    ('{"query": "q", "pos": "p", "neg": ["ok", 7], "instruction": "i"}', r":3: field 'neg\[1\]' must be a string"),
    ('{"query": "q", "pos": "p", "neg": [], "instruction": "i"}', r":3: field 'neg' must be a string or a non-empty"),
    ('["not", "an", "object"]', r":3: expected a JSON object"),
])
def test_malformed_stage2_rows(tmp_path, bad, pattern):
    path = _write(tmp_path, [json.dumps(GOOD2), "", bad])
    with pytest.raises(DataError, match=pattern) as e:
        load_rows(path, stage=2)
    assert str(e.value).startswith(path)


def test_stage1_rows_and_neg_normalisation(tmp_path):
    p1 = _write(tmp_path, [json.dumps({"context": "c", "instruction": "", "output": "o"})], "s1.jsonl")
    assert load_rows(p1, stage=1) == [{"context": "c", "instruction": "", "output": "o"}]
    p2 = _write(tmp_path, [json.dumps({**GOOD2, "neg": "single"})], "s2.jsonl")
    assert load_rows(p2, stage=2)[0]["neg"] == ["single"]
    bad = _write(tmp_path, [json.dumps({"context": "c", "instruction": "i", "output": ""})], "s1b.jsonl")
    with pytest.raises(DataError, match=r"s1b.jsonl:1: field 'output' is empty"):
        load_rows(bad, stage=1)


def test_json_and_parquet_go_through_datasets(tmp_path):
    import datasets

    rows = [GOOD2, {**GOOD2, "query": "q2"}]
    pj = tmp_path / "d.json"
    pj.write_text(json.dumps(rows))
    assert [r["query"] for r in load_rows(str(pj), stage=2)] == ["q", "q2"]
    pq = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list([{**GOOD2, "query": ""}]).to_parquet(pq)
    with pytest.raises(DataError, match=r"d.parquet: record 1: field 'query' is empty"):
        load_rows(pq, stage=2)


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"), stage=1)


def test_config_unknown_key_bad_type_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("stage: stage1\nmodel:\n  num_embed_tokenz: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model.num_embed_tokenz'"):
        load_config(str(y))
    with pytest.raises(ConfigError, match=r"key 'stage1.max_steps': expected int"):
        load_config(None, ["stage1.max_steps=many"])
    with pytest.raises(ConfigError, match=r"key 'loss.reference_sign'"):
        load_config(None, ["loss.reference_sign=both"])
    with pytest.raises(ConfigError, match=r"key 'scorer.kind': 'cuda' is not one of fused, cce"):
        load_config(None, ["scorer.kind=cuda"])
    with pytest.raises(ConfigError, match=r"key 'loss.kind': 'dpo' is not one of alignment"):
        load_config(None, ["loss.kind=dpo"])
    with pytest.raises(ConfigError, match=r"unknown key 'loss.betta' \(known: beta, detach_positive, kind, "
                                          r"reference_sign, tau\)"):
        load_config(None, ["loss.betta=0.2"])
    for old, new in (("loss.in_batch_negatives=true", "data.in_batch_negatives"),
                     ("loss.references=online", "reference.source"),
                     ("loss.stage1_contrast=1", "stage1_loss.contrast")):  # keys of earlier releases say where they went
        with pytest.raises(ConfigError, match=f"key '{old.split('=')[0]}' is now '{new}'"):
            load_config(None, [old])
    with pytest.raises(ConfigError, match=r"key 'reference.micro_batch_size' must be >= 1"):
        load_config(None, ["reference.micro_batch_size=0"])
    from autoregembed.run.stages import stages_for

    own = load_config(None, ["reference.micro_batch_size=32", "stage2.micro_batch_size=4"])
    assert stages_for(own)["reference"].settings().micro_batch_size == 32  # its own section, not stage 2's
    assert stages_for(load_config(None, ["stage2.micro_batch_size=4"]))["reference"].settings().micro_batch_size == 4
    cfg = load_config(None, ["stage2.learning_rate=1e-5", "loss.reference_sign=code", "data.max_negatives=3"])
    assert cfg.stage2.learning_rate == 1e-5 and cfg.loss.objective.reference_sign == "code"
    assert cfg.data.max_negatives == 3


def _one_key_settings():
    """Every scalar key of every section, as ``--set`` text holding its default value."""
    import dataclasses

    import yaml

    default = load_config(None, [])
    for section in dataclasses.fields(default):
        value = getattr(default, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        component = getattr(value, getattr(value, "COMPONENT", ""), None)  # a kind's object: its fields are keys too
        fields = [f.name for f in dataclasses.fields(value) if f.name != getattr(value, "COMPONENT", None)]
        fields += [f.name for f in dataclasses.fields(component)] if component is not None else []
        for name in fields:
            v = getattr(component, name) if not hasattr(value, name) else getattr(value, name)
            if isinstance(v, (list, dict)):
                continue
            yield f"{section.name}.{name}", v if isinstance(v, str) else yaml.safe_dump(v).split("\n")[0]


def test_setting_one_key_of_a_section_keeps_its_other_defaults(tmp_path):
    """Stage sections have defaults of their own (stage 2 learns at 2e-4, stage 1 takes 16 rows): a
    section built from one key must merge onto them, from --set and from YAML alike."""
    default = load_config(None, [])
    settings = list(_one_key_settings())
    assert {"stage1.max_steps", "stage2.learning_rate", "loss.beta", "mine.negatives", "eval.pooling",
            "scorer.row_stats"} <= \
           {k for k, _ in settings}
    for key, text in settings:
        assert load_config(None, [f"{key}={text}"]) == default, key
    changed = load_config(None, ["stage2.max_steps=100"])
    assert (changed.stage2.max_steps, changed.stage2.learning_rate) == (100, default.stage2.learning_rate)
    assert changed.stage1 == default.stage1
    y = tmp_path / "c.yaml"
    y.write_text("stage1: {max_steps: 5}\nstage2: {max_steps: 5}\nloss: {tau: 0.2}\n")
    from_yaml = load_config(str(y))
    assert (from_yaml.stage1.micro_batch_size, from_yaml.stage2.learning_rate) == (16, 2e-4)
    assert (from_yaml.loss.objective.tau, from_yaml.loss.objective.beta) == (0.2, default.loss.objective.beta)


def test_config_runtime_checks_name_the_key(tmp_path):
    cfg = load_config(None, [f"data.stage2={tmp_path}/missing.jsonl"])
    with pytest.raises(ConfigError, match=r"key 'data.stage2': no such file"):
        stages_for(cfg).check()
    with pytest.raises(ConfigError, match=r"key 'model.base': no such file or folder"):
        check_runtime(load_config(None, [f"model.base={tmp_path}/no-model"]), world_size=1)
    cfg = load_config(None, ["stage1.micro_batch_size=4", "stage1.gradient_accumulation_steps=2",
                             "stage1.global_batch_size=32"])
    check_runtime(cfg, world_size=4)
    with pytest.raises(ConfigError, match=r"'stage1.global_batch_size' = 32 .* 4 x 2 x 2 = 16"):
        check_runtime(cfg, world_size=2)


def test_ds_config_autos_are_filled_and_contradictions_refused(tmp_path):
    import torch

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(None, ["stage1.micro_batch_size=3", "stage1.gradient_accumulation_steps=2"])
    arch = Arch.load("llama-2-7b")
    ds = build_ds_config(os.path.join(root, "ds_configs", "zero3.json"), cfg.stage1, 2, arch, torch.float32)
    assert ds["train_batch_size"] == 12 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["bf16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096 * 11008  # the largest matrix of a layer
    assert zero["stage3_prefetch_bucket_size"] == arch.layer_params() > 200e6  # a whole layer ahead
    for name in ("zero3.json", "zero3_offload.json", "zero2.json", "zero3_multinode.json"):
        build_ds_config(os.path.join(root, "ds_configs", name), cfg.stage1, 16, arch, torch.bfloat16, 8)
    multi = build_ds_config(os.path.join(root, "ds_configs", "zero3_multinode.json"), cfg.stage1, 16, arch,
                            torch.bfloat16, gpus_per_node=8)
    assert multi["zero_optimization"]["zero_hpz_partition_size"] == 8
    with pytest.raises(ConfigError, match="train_batch_size = 99 contradicts"):
        build_ds_config({"train_batch_size": 99}, cfg.stage1, 2, arch, torch.float32)


def test_sampler_is_deterministic_and_covers_rows():
    s = StepSampler(num_rows=10, micro_batch_size=2, grad_accum=2, world_size=2, seed=1)
    first_epoch = [i for step in range(2) for m in range(2) for r in range(2) for i in s.indices(step, m, r)]
    assert sorted(first_epoch[:10]) == list(range(10))  # each row once per epoch
    s2 = StepSampler(num_rows=10, micro_batch_size=2, grad_accum=2, world_size=2, seed=1)
    assert s2.indices(7, 1, 1) == s.indices(7, 1, 1)  # resume at any step reproduces the order


def test_sts_file_errors(tmp_path):
    p = tmp_path / "sts.csv"
    p.write_text("g\tf\ty\t1\t4.0\ta\tb\ng\tf\ty\t2\tfive\ta\tb\n")
    with pytest.raises(ValueError, match=r"sts.csv:2: field 'score' is not a number"):
        read_sts(str(p))


def test_shipped_configs_are_valid():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "configs")
    names = sorted(os.listdir(folder))
    assert names
    for name in names:
        load_config(os.path.join(folder, name))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")
def test_a_gpu_job_without_cuda_stops_instead_of_training_on_cpu(tmp_path):
    from autoregembed.ground.distributed import select_device

    with pytest.raises(ConfigError, match=r"SLURM_GPUS_ON_NODE=8 asks for GPUs but torch .* CPU-only build"):
        select_device("auto", {"SLURM_GPUS_ON_NODE": "8"})
    with pytest.raises(ConfigError, match="device=cuda asks for GPUs"):
        select_device("cuda", {})
    select_device("auto", {"SLURM_GPUS_ON_NODE": "0"})  # a CPU job on a Slurm cluster
    env = {"SLURM_JOB_GPUS": "0,1"}
    select_device("cpu", env)  # on purpose: GPUs hidden before CUDA is initialised
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    # through the entry point: one line, before any model is built
    proc = run_child([os.path.join(ROOT, "train.py"), "--set", "device=cuda", "--set", f"output_dir={tmp_path / 'run'}"],
                     timeout=120)
    assert proc.returncode != 0 and "device=cuda asks for GPUs" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,pattern", [
    ("stage1.max_steps=0", r"'stage1.max_steps' must be >= 1"),
    ("stage2.log_every=0", r"'stage2.log_every' must be >= 1"),
    ("stage1.warmup_steps=-1", r"'stage1.warmup_steps' must be >= 0"),
    ("stage1.keep_last=-2", r"'stage1.keep_last' must be >= 0"),
    ("stage1.learning_rate=-1e-4", r"'stage1.learning_rate' must be a finite number >= 0"),
    ("stage2.learning_rate=.nan", r"'stage2.learning_rate' must be a finite number >= 0, got nan"),
    ("stage1.gradient_clipping=.inf", r"'stage1.gradient_clipping' must be a finite"),
    ("stage1.global_batch_size=0", r"'stage1.global_batch_size' must be >= 1"),
    ("loss.tau=0", r"'loss.tau' must be a finite number > 0"),
    ("loss.beta=-0.1", r"'loss.beta' must be a finite number > 0"),
    ("stage1_loss.contrast=-1", r"'stage1_loss.contrast' must be a finite number >= 0"),
    ("stage1_loss.kind=mse", r"'stage1_loss.kind': 'mse' is not one of compression"),
    ("stage1.lr_schedule=step", r"'stage1.lr_schedule': 'step' is not one of linear, cosine, constant"),
    ("data.max_text_len=0", r"'data.max_text_len' must be >= 1"),
    ("data.max_target_len=-5", r"'data.max_target_len' must be >= 1"),
    ("data.max_negatives=0", r"'data.max_negatives' must be >= 1"),
    ("eval.batch_size=0", r"'eval.batch_size' must be >= 1"),
    ("model.tiny_hidden_size=30", r"'model.tiny_hidden_size' \(a multiple of 4"),
    ("stage1.micro_batch_size=[4]", r"key 'stage1.micro_batch_size': expected int"),
    ("stage1.micro_batch_size={", r"--set stage1.micro_batch_size: '\{' is not a valid value"),
    ("device=gpu", r"key 'device': 'gpu' is not auto, cuda or cpu"),
])
def test_bad_values_name_their_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_lr_schedules_warm_up_then_decay_or_hold():
    from autoregembed.run.session import lr_factor

    for schedule, after in (("linear", [1.0, 0.75, 0.5, 0.25, 0.0]), ("constant", [1.0] * 5),
                            ("cosine", [1.0, 0.8536, 0.5, 0.1464, 0.0])):
        f = lr_factor(schedule, warmup=3, total=7)
        assert [f(s) for s in range(3)] == [0.25, 0.5, 0.75], schedule  # the same warm-up
        assert [round(f(s), 4) for s in range(3, 8)] == after, schedule


def test_the_client_optimizer_is_fused_only_on_cuda():
    from autoregembed.run.config import OptimConfig
    from autoregembed.run.session import client_adamw

    params = [torch.nn.Parameter(torch.ones(3))]
    o = OptimConfig(learning_rate=0.01, weight_decay=0.1)
    cpu = client_adamw(params, o, on_cuda=False)
    assert not cpu.defaults["fused"] and cpu.defaults["lr"] == 0.01 and cpu.defaults["weight_decay"] == 0.1
    assert client_adamw(params, o, on_cuda=True).defaults["fused"] is True


def test_stage1_contrast_needs_two_rows_per_micro_batch():
    with pytest.raises(ConfigError, match=r"'stage1.micro_batch_size' must be >= 2 for stage 1's objective "
                                          r"CompressionLoss\(contrast=1.0\)"):
        load_config(None, ["stage1_loss.contrast=1", "stage1.micro_batch_size=1"])
    assert load_config(None, ["stage1_loss.contrast=1", "stage1.micro_batch_size=2"]).stage1_loss.objective.contrast == 1
    assert load_config(None, ["stage1_loss.contrast=0", "stage1.micro_batch_size=1"]).stage1_loss.objective.contrast == 0


def test_string_keys_take_the_raw_text_and_paths_expand(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RUNS", "/scratch/runs")
    cfg = load_config(None, ["eval.instruction=Find #1 [x] at 100%: a: b", "output_dir=~/out",
                             "paths.reference_scores=$RUNS/scores.safetensors", "paths.stage1_model=null"])
    assert cfg.eval.instruction == "Find #1 [x] at 100%: a: b"
    assert cfg.output_dir == str(tmp_path / "out")
    assert cfg.paths.reference_scores == "/scratch/runs/scores.safetensors"
    assert cfg.paths.stage1_model is None


def test_user_errors_are_one_line_with_status_2_before_anything_loads(tmp_path):
    for args, want in ((["--set", "loss.tau=0"], "autoregembed: error: key 'loss.tau' must be"),
                       (["--set", "data.stage1=" + str(tmp_path / "none.jsonl"), "--set", "stage=stage1"],
                        "autoregembed: error: key 'data.stage1': no such file"),
                       (["--set", "stage=reference"], "autoregembed: error: key 'paths.stage1_model': no stage-1 "
                        f"export at {tmp_path / 'run' / 'stage1' / 'model'}"),
                       (["--deepspeed", str(tmp_path / "none.json")], "autoregembed: error: --deepspeed: no such file"),
                       (["--set", "model.base=nosuchorg/nosuchmodel"],
                        "autoregembed: error: key 'model.base': 'nosuchorg/nosuchmodel' is not a local folder")):
        proc = run_child([os.path.join(ROOT, "train.py"), "--set", f"output_dir={tmp_path / 'run'}", *args], timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(want) and "Traceback" not in proc.stderr
        assert not (tmp_path / "run").exists()


def test_non_utf8_data_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"context": "a", "instruction": "i", "output": "a"}\n{"context": "caf\xe9", "instruction": "i", "output": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8 text \(byte 0xe9 at column 17\)"):
        load_rows(str(path), stage=1)


def test_sts_file_with_constant_gold_scores_is_refused(tmp_path):
    p = tmp_path / "sts.csv"
    p.write_text("g\tf\ty\t1\t3.0\ta\tb\ng\tf\ty\t2\t3.0\tc\td\n")
    with pytest.raises(ValueError, match=r"every gold score is 3.0; Spearman correlation needs"):
        read_sts(str(p))


def test_encoder_inputs_are_checked_and_empty_input_keeps_its_width(tiny_base):
    from transformers import AutoModel, AutoTokenizer

    from autoregembed.release.encoder import Encoder
    from autoregembed.method.tokenization import prepare_tokenizer

    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_base), 5)
    model = AutoModel.from_pretrained(tiny_base)
    model.resize_token_embeddings(len(tok))
    enc = Encoder(model, tok, 5, "Retrieve semantically similar text.", max_text_len=64)
    assert enc.encode([]).shape == (0, 32)
    assert enc.encode(["a", ""]).shape == (2, 32)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        enc.encode(["a"], batch_size=0)
    with pytest.raises(TypeError, match=r"sentences\[1\] is int, not str"):
        enc.encode(["a", 3])
    with pytest.raises(ValueError, match=r"model's 512 positions leave 0 beside BOS, a text of up to "
                                         r"data.max_text_len=512 tokens"):  # every text must fit, not only short ones
        Encoder(model, tok, 5, "Retrieve semantically similar text.", max_text_len=512)


def test_plan_refuses_impossible_shapes(capsys):
    from autoregembed.tools.cli import main

    for argv in (["--gpus-per-node", "0"], ["--negatives", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(["plan", "--model", "llama-2-7b", *argv])
        assert e.value.code == 2
    assert "--gpus-per-node must be >= 1" in capsys.readouterr().err


def test_written_files_follow_the_umask(tmp_path):
    from safetensors.torch import save_file

    from autoregembed.ground.atomic import atomic_dir, atomic_file, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(str(tmp_path / "a.txt"), "x")
        with atomic_file(str(tmp_path / "b.bin")) as tmp:
            open(tmp, "wb").close()
        with atomic_file(str(tmp_path / "c.safetensors")) as tmp:  # safetensors replaces the file, mode 0600
            save_file({"x": torch.zeros(2)}, tmp)
        with atomic_dir(str(tmp_path / "d")) as tmp:
            os.mkdir(os.path.join(tmp, "sub"))
            save_file({"x": torch.zeros(2)}, os.path.join(tmp, "sub", "w.safetensors"))
    finally:
        os.umask(old)
    for name in ("a.txt", "b.bin", "c.safetensors", "d/sub/w.safetensors"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o644), name
    for name in ("d", "d/sub"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o755), name


def test_a_full_disk_keeps_the_old_file_and_leaves_no_partial_copy(tmp_path, monkeypatch):
    from autoregembed.ground.atomic import atomic_write_text

    path = tmp_path / "record.json"
    atomic_write_text(str(path), "old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(str(path), "new")
    assert os.listdir(tmp_path) == ["record.json"] and path.read_text() == "old"


WRITER_KILLED_INSIDE = """
import os, signal, sys, time
from autoregembed.ground.atomic import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    open(os.path.join(tmp, "half-written"), "w").close()
    print("inside", flush=True)
    time.sleep(60)  # SIGKILLed here: no cleanup runs
"""


def test_atomic_dir_sweeps_a_killed_writers_leftovers_and_spares_a_live_ones(tmp_path):
    import signal
    import subprocess

    from helpers import ROOT, child_command, child_env

    from autoregembed.ground.atomic import atomic_dir

    final = str(tmp_path / "model")
    with atomic_dir(final) as tmp:
        open(os.path.join(tmp, "v1"), "w").close()
    writer = subprocess.Popen(child_command(["-c", WRITER_KILLED_INSIDE, final]), env=child_env(),
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert writer.stdout.readline() == "inside\n"
        leftovers = sorted(n for n in os.listdir(tmp_path) if n != "model")
        assert len(leftovers) == 2 and leftovers[1] == leftovers[0] + ".lock"
        with atomic_dir(final) as tmp:  # the other writer is alive: its folder is left alone
            open(os.path.join(tmp, "v2"), "w").close()
        assert sorted(n for n in os.listdir(tmp_path) if n != "model") == leftovers
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    with atomic_dir(final) as tmp:
        open(os.path.join(tmp, "v3"), "w").close()
    assert os.listdir(tmp_path) == ["model"] and os.listdir(final) == ["v3"]


def test_atomic_dir_puts_back_a_previous_result_an_interrupted_replacement_set_aside(tmp_path):
    from autoregembed.ground.atomic import atomic_dir

    final = tmp_path / "model"
    (tmp_path / "model.old-abc" / "x").mkdir(parents=True)  # killed between its two renames
    (tmp_path / "model.old-abc" / "x" / "weights").write_text("v1")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(str(final)):
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == ["model"] and (final / "weights").read_text() == "v1"


def test_tiny_base_reads_data_like_the_loader_and_refuses_a_changed_size(tmp_path):
    from autoregembed.run.loading import build_tiny_base

    s1 = _write(tmp_path, ['{"context": "a cat sat", "instruction": "i", "output": "a cat sat"}', "",
                           '{"context": "dogs run", "instruction": "i", "output": "dogs run"}'])
    s2 = tmp_path / "s2.json"
    s2.write_text(json.dumps([{**GOOD2, "query": f"query {i}"} for i in range(3)]))
    out = str(tmp_path / "base")
    build_tiny_base(out, [s1, str(s2)], hidden_size=32, layers=1, pretrain_steps=0)
    assert os.path.exists(os.path.join(out, "config.json"))
    build_tiny_base(out, [s1, str(s2)], hidden_size=32, layers=1, pretrain_steps=0)  # same shape: kept
    with pytest.raises(ConfigError, match=r"already holds a tiny base with hidden size 32, 1 layers and seed 0, "
                                          r"not 64, 1 and 0"):
        build_tiny_base(out, [s1, str(s2)], hidden_size=64, layers=1)
    with pytest.raises(ConfigError, match=r"seed 0, not 32, 1 and 7 .*model.tiny_seed"):
        build_tiny_base(out, [s1, str(s2)], hidden_size=32, layers=1, seed=7)


def test_the_tiny_base_is_the_runs_starting_model_whatever_the_runs_seed(monkeypatch, tmp_path):
    """The tiny base stands in for a downloaded model: a run's seed does not change it, model.tiny_seed does."""
    from autoregembed.run import loading
    from autoregembed.run.config import load_config
    from autoregembed.run.session import RunContext

    built = []
    monkeypatch.setattr(loading, "build_tiny_base", lambda out, files, **kw: built.append(kw["seed"]))
    for sets in (["seed=1"], ["seed=2"], ["seed=2", "model.tiny_seed=5"]):
        RunContext.of(load_config(None, [f"output_dir={tmp_path}", *sets]), None).base()
    assert built == [0, 0, 5]


def test_non_utf8_sts_file_names_its_line(tmp_path):
    p = tmp_path / "sts.csv"
    p.write_bytes(b"g\tf\ty\t1\t4.0\ta\tb\ng\tf\ty\t2\t1.0\tcaf\xe9\td\n")
    with pytest.raises(DataError, match=r"sts.csv:2: not UTF-8 text \(byte 0xe9\)"):
        read_sts(str(p))


def test_a_bad_row_fails_the_run_before_the_base_model_is_built(tmp_path):
    bad = _write(tmp_path, ['{"context": "a", "instruction": "i", "output": "a"}', '{"context": "b", "instruction": "i"}'])
    out = tmp_path / "run"
    proc = run_child([os.path.join(ROOT, "train.py"), "--set", f"output_dir={out}", "--set", f"data.stage1={bad}"],
                     timeout=120)
    assert proc.returncode == 2 and f"{bad}:2: missing field 'output'" in proc.stderr
    assert not (out / "base").exists()


def test_export_description_round_trips_and_a_broken_one_names_its_file(tmp_path):
    import json as _json

    from autoregembed.release.meta import META_FILE, ExportMeta

    meta = ExportMeta(num_embed_tokens=3, instruction="Find it.", max_text_len=40, stage="stage2", decoder_bos=True,
                      pooled=[1, 3])
    meta.write(str(tmp_path))
    assert ExportMeta.read(str(tmp_path)) == meta and meta.pooled_positions == [0, 2]
    written = _json.loads((tmp_path / META_FILE).read_text())
    assert written["template"] == "[BOS]{text}\n{instruction}\n<EMBED0><EMBED1><EMBED2>"  # for readers without us
    (tmp_path / META_FILE).write_text(_json.dumps({"instruction": "x"}))
    with pytest.raises(ValueError, match=f"{tmp_path / META_FILE}: not a valid autoregembed export description"):
        ExportMeta.read(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not an autoregembed export"):
        ExportMeta.read(str(tmp_path / "elsewhere"))


def test_a_session_that_fails_to_load_leaves_no_zero3_config_behind(tmp_path, tiny_base):
    """Transformers' ZeRO-3 global is set only while a Session lives: a failed load must clear it, or
    every later from_pretrained in the process would build partitioned, empty models."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from autoregembed.tools.cli import DEFAULT_DS
    from autoregembed.run.stages import stages_for
    from autoregembed.run.session import RunContext, Session

    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.base={tiny_base}"])
    with pytest.raises(OSError) as failure:
        Session(RunContext.of(cfg, DEFAULT_DS), stages_for(cfg)["stage1"], str(tmp_path / "no-such-model"), train=True)
    assert failure.tb is not None  # an error handler still holds the failed Session's frames here
    assert not is_deepspeed_zero3_enabled()


def test_every_input_is_read_before_any_model_loads(tmp_path):
    """A bad STS line used to surface after stage 1, reference scoring and stage 2 had run (hours at 7B),
    and a line over csv's field limit as a raw _csv.Error; encode's input after its model had loaded."""
    long = tmp_path / "long.csv"
    long.write_text("g\tf\ty\t1\t2.0\ta\tb\n" + "g\tf\ty\t2\t3.0\t" + "x" * 140000 + "\tb\n")
    proc = run_child([os.path.join(ROOT, "train.py"), "--set", f"output_dir={tmp_path / 'run'}",
                      "--set", f"eval.sts_file={long}"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"autoregembed: error: key 'eval.sts_file': {long}:2: field "
                                                    f"larger than field limit (131072)")
    assert not (tmp_path / "run").exists()  # not even the tiny base was built
    missing_model = str(tmp_path / "no-model")  # never opened: the inputs fail first
    for args, want in ((["encode", "--input", str(tmp_path / "none.txt"), "--output", str(tmp_path / "e.npy")],
                        str(tmp_path / "none.txt")),
                       (["eval", "--sts", str(long)], f"{long}:2: field larger than field limit")):
        proc = run_child(["-m", "autoregembed.tools.cli", *args, "--model", missing_model], timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert want in proc.stderr and missing_model not in proc.stderr
