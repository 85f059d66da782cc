"""The error contract (errors.py): what the user can fix is a UserError, printed as one line with
exit status 2 before anything loads; a bug keeps its traceback."""
import ast
import builtins
import importlib
import json
import os
import shutil

import pytest
import torch
from helpers import ROOT, run_child

from autoregembed.run.config import ConfigError, load_config
from autoregembed.run.ds_config import check_early, read_ds_config
from autoregembed.ground.errors import InputError, StorageError, UserError, user_message
from autoregembed.ground.arch import Arch
from autoregembed.run.stages import stages_for

PACKAGE = os.path.join(ROOT, "autoregembed")
PATHLIKE = ("path", "file", "folder", "dir", "input", "output", "source", "model")


def _raises():
    """(module, line, class expression, message literal parts, first formatted name) of every
    ``raise X(<message>)`` in the package."""
    for folder, _, files in sorted(os.walk(PACKAGE)):  # symlinked kernels/ and ds_configs/ are not walked
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            module = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
            yield from _raises_in(module, ast.parse(open(path).read()))


def _raises_in(module: str, tree):
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
            continue
        msg = node.exc.args[0]
        if isinstance(msg, ast.Constant) and isinstance(msg.value, str):
            parts, first = [msg.value], None
        elif isinstance(msg, ast.JoinedStr):
            parts = [v.value for v in msg.values if isinstance(v, ast.Constant)]
            head = msg.values[0]
            first = ast.unparse(head.value) if isinstance(head, ast.FormattedValue) else None
            if first is not None and not (len(msg.values) > 1 and isinstance(msg.values[1], ast.Constant)
                                          and msg.values[1].value.startswith(":")):
                first = None  # only "{path}: ..." names a file
        else:
            continue
        yield module, node.lineno, ast.unparse(node.exc.func), "".join(parts), first


def _resolve(module: str, expr: str):
    """The class a raise names: the module's own name (``checkpoint.CheckpointError`` too), one of
    errors.py's (imported inside a function), or a builtin."""
    obj = importlib.import_module(f"autoregembed.{module}")
    for part in expr.split("."):
        if not hasattr(obj, part):
            errors = importlib.import_module("autoregembed.ground.errors")
            return getattr(errors, expr, None) or getattr(builtins, expr, None)
        obj = getattr(obj, part)
    return obj


def test_every_raise_that_names_a_key_a_file_or_an_option_is_a_user_error():
    """A message that names a config key ("key '...'"), a command-line option ("--x") or a file
    ("{path}: ...") is addressed to the user, so its class must be a UserError: the CLI prints it
    as one line instead of a traceback."""
    checked, wrong = 0, []
    for module, line, expr, text, first in _raises():
        names_key = "key '" in text or text.startswith("--")
        names_file = first is not None and any(w in first.lower() for w in PATHLIKE)
        if not (names_key or names_file):
            continue
        checked += 1
        cls = _resolve(module, expr)
        if not (isinstance(cls, type) and issubclass(cls, UserError)):
            wrong.append(f"autoregembed/{module}.py:{line}: raise {expr}(...)")
    assert checked > 40  # the scan finds the messages it is about
    assert not wrong, "user-facing errors that are not UserErrors:\n" + "\n".join(wrong)


def test_user_message_says_one_line_for_user_errors_and_nothing_for_bugs(tmp_path):
    assert user_message(ConfigError("key 'x': bad")) == "key 'x': bad"
    try:
        open(tmp_path / "missing.txt")
    except OSError as e:  # the OS names the file: the user's environment, not our code
        assert user_message(e) == f"{tmp_path / 'missing.txt'}: No such file or directory"
    assert user_message(TypeError("unsupported operand")) is None
    assert user_message(ValueError("a bug's ValueError")) is None
    assert user_message(OSError("no file named")) is None


def test_config_and_deepspeed_files_that_are_folders_or_malformed_name_themselves(tmp_path):
    with pytest.raises(ConfigError, match=f"--config: {tmp_path} is a folder"):
        load_config(str(tmp_path))
    with pytest.raises(ConfigError, match=f"--deepspeed: {tmp_path} is a folder"):
        read_ds_config(str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1:\n  max_steps: 3\n  micro_batch_size: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{bad}:[34]: not valid YAML"):
        load_config(str(bad))


def test_a_value_deepspeed_refuses_fails_before_the_engine(tmp_path):
    ds = json.load(open(os.path.join(ROOT, "ds_configs", "zero3.json")))
    ds["zero_optimization"]["stage"] = 7
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = load_config(None, [])
    with pytest.raises(ConfigError, match=f"{path}: DeepSpeed refuses it: .*stage"):
        check_early(str(path), {"stage1": cfg.stage1}, 1, Arch.load("smollm2-135m"), torch.float32)
    for name in ("zero2.json", "zero3.json", "zero3_offload.json", "zero3_multinode.json"):  # the shipped ones pass
        check_early(os.path.join(ROOT, "ds_configs", name), {"stage1": cfg.stage1, "stage2": cfg.stage2}, 2,
                    Arch.load("smollm2-135m"), torch.float32)


def test_export_and_eval_without_their_input_are_refused_up_front(tmp_path):
    for stage, pattern in (("export", "no complete checkpoint in"), ("eval", "no export at")):
        cfg = load_config(None, [f"output_dir={tmp_path}", f"stage={stage}", "paths.export_from=stage1"])
        with pytest.raises(ConfigError, match=f"key 'paths.export_from' = stage1: {pattern}"):
            stages_for(cfg).check()


def test_a_learning_rate_of_zero_is_refused():
    with pytest.raises(ConfigError, match=r"key 'stage2.learning_rate' must be > 0"):
        load_config(None, ["stage2.learning_rate=0"])


def test_plan_with_an_unknown_model_is_one_line(capsys):
    from autoregembed.tools.cli import main

    assert main(["plan", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoregembed: error: --model: 'no-such-model' is neither")


def test_a_bug_in_a_tool_keeps_its_traceback(monkeypatch, tmp_path):
    from autoregembed.tools import cli

    def broken(args):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(cli, "_plot", broken)
    with pytest.raises(TypeError):
        cli.main(["plot", str(tmp_path)])


@pytest.mark.parametrize("k,pattern", [(0, "num_embed_tokens must be >= 1"),
                                       (7, "num_embed_tokens = 7 but the export's tokenizer has 5 EMBED tokens"),
                                       (5, r"pooled must be null or distinct positions in 1..5, got \[0, 6\]")])
def test_an_export_whose_description_disagrees_with_its_tokenizer_is_refused(tiny_export, tmp_path, k, pattern):
    from autoregembed.release.encoder import Encoder
    from autoregembed.release.meta import META_FILE

    copy = tmp_path / "model"
    shutil.copytree(tiny_export, copy)
    meta = json.loads((copy / META_FILE).read_text())
    (copy / META_FILE).write_text(json.dumps({**meta, "num_embed_tokens": k, **({"pooled": [0, 6]} if k == 5 else {})}))
    with pytest.raises(InputError, match=pattern):
        Encoder.from_pretrained(str(copy), device="cpu")


@pytest.mark.parametrize("spec,want", [("all", None), ("all_but_last", [0, 1, 2, 3]), ("3", [2]), ("4,1", [0, 3]),
                                       ("0", "in 1..5"), ("6", "in 1..5"), ("2,2", "distinct"), ("first", "is not all")])
def test_pooling_names_its_positions_or_says_what_is_wrong(spec, want):
    """eval.pooling: the e_i an embedding averages; a bad value is one line naming the key, before any load."""
    from autoregembed.method.model import pooled_positions
    from autoregembed.run.config import ConfigError, load_config

    if not isinstance(want, str):
        assert pooled_positions(spec, 5) == want
        assert load_config(None, [f"eval.pooling={spec}"]).eval.pooling == spec
        return
    with pytest.raises(ValueError, match=want):
        pooled_positions(spec, 5)
    with pytest.raises(ConfigError, match=f"key 'eval.pooling': .*{want}"):
        load_config(None, [f"eval.pooling={spec}"])


def test_a_full_disk_during_export_is_a_user_error_and_keeps_the_old_export(tiny_base, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from autoregembed.release import export
    from autoregembed.run.loading import load_model

    model, tok = load_model(tiny_base, tiny_base, 5, torch.float32, "sdpa")
    out = str(tmp_path / "model")
    meta = export.ExportMeta(num_embed_tokens=5, instruction="i", max_text_len=32)
    export.export_encoder(model.encoder, tok, out, meta)
    before = sorted(os.listdir(out))

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(export, "save_file", full)
    with pytest.raises(StorageError, match=f"{out}: writing the export failed .*StorageFull.*intact"):
        export.export_encoder(model.encoder, tok, out, meta)
    assert sorted(os.listdir(out)) == before
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary folder left beside it


def test_new_user_errors_reach_the_command_line_as_one_line_before_anything_loads(tmp_path):
    ds = json.load(open(os.path.join(ROOT, "ds_configs", "zero3.json")))
    ds["zero_optimization"]["stage"] = 7
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    (tmp_path / "bad.yaml").write_text("stage1: [\n")
    for args, want in ((["--deepspeed", str(tmp_path / "ds.json")], f"{tmp_path / 'ds.json'}: DeepSpeed refuses it"),
                       (["--config", str(tmp_path / "bad.yaml")], f"{tmp_path / 'bad.yaml'}:2: not valid YAML")):
        proc = run_child([os.path.join(ROOT, "train.py"), "--set", f"output_dir={tmp_path / 'run'}", *args], timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"autoregembed: error: {want}") and "Traceback" not in proc.stderr, last
        assert not (tmp_path / "run").exists()


HUB_CALLS = {"load_dataset", "repo_info", "model_info", "dataset_info", "whoami", "create_repo", "create_commit",
             "snapshot_download", "hf_hub_download", "upload_folder", "mteb.evaluate"}


def _hub_calls_outside_answering():
    """Every call that asks the hub (HUB_CALLS) outside a ``with hub.answering(...)`` block: the
    calls that only read local files (``data_files=``, ``local_files_only=True``) are not asking."""
    for folder, _, files in sorted(os.walk(PACKAGE)):
        for name in sorted(f for f in files if f.endswith(".py") and f != "hub.py"):
            path = os.path.join(folder, name)
            tree = ast.parse(open(path).read())
            guarded = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.With) and any(
                        isinstance(i.context_expr, ast.Call) and ast.unparse(i.context_expr.func).endswith("answering")
                        for i in node.items):
                    guarded |= {id(n) for n in ast.walk(node)}
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                func = ast.unparse(node.func)
                called = func if func == "mteb.evaluate" else func.split(".")[-1]
                local = {kw.arg for kw in node.keywords} & {"data_files", "local_files_only"}
                if called in HUB_CALLS and not local and id(node) not in guarded:
                    yield f"{os.path.relpath(path, ROOT)}:{node.lineno}: {func}(...)"


def test_every_call_that_asks_the_hub_fails_as_one_line():
    """Offline nodes: a hub call outside ``hub.answering`` would print a traceback after retries."""
    assert not list(_hub_calls_outside_answering())


def test_every_stage_honours_a_stop_request_while_it_runs():
    """SIGINT, SIGTERM and the STOP file alike (preemption.py): a training stage within
    ``preemption.CHECK_EVERY`` steps (its request rides the all-reduce of its step metrics: ``asked``),
    reference scoring between batches, mine between chunks of its encoding and at once in its selection,
    eval at once (``on_rank0``). Export is collective (each
    tensor is gathered from every rank) and short: a request is honoured at the boundary after it."""
    import inspect
    import signal

    from autoregembed.run import preemption, scoring, stages, trainer

    honours = {"stage1": trainer.train_stage, "stage2": trainer.train_stage, "reference": scoring.score_references}
    for stage in stages.PIPELINE:
        if stage.name == "export":
            continue
        source = inspect.getsource(honours.get(stage.name, stage.run))
        assert any(call in source for call in ("preemption.requested(", "preemption.asked(", "on_rank0(")), \
            stage.name
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        preemption.install()
        assert all(signal.getsignal(s) is preemption._handler for s in old)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert [os.path.relpath(p, PACKAGE) for p in _files_calling("signal.signal(")] == ["run/preemption.py"]


def _files_calling(text: str) -> list[str]:
    return [os.path.join(folder, n) for folder, _, files in sorted(os.walk(PACKAGE)) for n in sorted(files)
            if n.endswith(".py") and text in open(os.path.join(folder, n)).read()]
