"""autoregembed push: one commit with every file of the export and a card rendered for the repository,
against a recording stand-in for the Hub's API (no network here)."""
import json


from autoregembed.release.model_card import CARD_FILE


class RecordingHub:
    """The two HfApi calls push makes, recorded; the uploaded bytes read as the Hub would."""

    def __init__(self):
        self.repos, self.commits = [], []

    def whoami(self):
        return {"name": "me", "orgs": [{"name": "my-lab"}]}

    def create_repo(self, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            data = op.path_or_fileobj
            files[op.path_in_repo] = open(data, "rb").read() if isinstance(data, str) else data
        self.commits.append((repo_id, files, kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://hub.test/{repo_id}/commit/1"})()


def test_push_commits_every_file_and_a_card_for_the_repository(tiny_export):
    import os

    from autoregembed.release.push import export_files, push

    hub = RecordingHub()
    url = push(tiny_export, "me/my-embedder", private=True, api=hub)
    assert url == "https://hub.test/me/my-embedder/commit/1"
    assert hub.repos == [("me/my-embedder", {"private": True, "exist_ok": True, "repo_type": "model"})]
    (repo, files, kwargs), = hub.commits
    assert set(files) == set(export_files(tiny_export)) | {CARD_FILE}
    assert {"autoregembed.json", "modules.json", "tokenizer.json", "config.json"} <= set(files)
    for name in export_files(tiny_export):
        assert files[name] == open(os.path.join(tiny_export, name), "rb").read()
    card = files[CARD_FILE].decode()
    assert "SentenceTransformer('me/my-embedder')" in card and "# my-embedder" in card
    assert tiny_export not in card  # the local path stays local


def test_push_refuses_a_folder_that_is_not_an_export_or_a_bad_repo_id(tmp_path, tiny_export, capsys):
    from autoregembed.tools.cli import main

    assert main(["push", "--model", str(tmp_path), "--repo", "me/x"]) == 2
    assert "not an autoregembed export" in capsys.readouterr().err
    assert main(["push", "--model", tiny_export, "--repo", "no-owner"]) == 2
    assert "--repo: 'no-owner' is not a Hub repository id" in capsys.readouterr().err


def test_an_evaluated_exports_card_keeps_its_result_when_pushed(tiny_export, tmp_path):
    import shutil

    from autoregembed.release.model_card import write_model_card
    from autoregembed.release.push import push

    model = tmp_path / "model"
    shutil.copytree(tiny_export, model)
    write_model_card(str(model), {"model": str(model), "sts": "/d/sts-dev.csv", "spearman_x100": 61.25,
                                  "mean_pairwise_cosine": 0.5})
    hub = RecordingHub()
    push(str(model), "me/x", api=hub)
    card = hub.commits[0][1][CARD_FILE].decode()
    assert "| sts-dev.csv | 61.25 | 0.500 |" in card
    assert json.loads(hub.commits[0][1]["autoregembed.json"])["evaluation"]["spearman_x100"] == 61.25


def test_push_checks_the_token_and_the_owner_before_uploading(tiny_export):
    import pytest

    from autoregembed.release.push import push
    from autoregembed.ground.hub import HubError

    hub = RecordingHub()
    with pytest.raises(HubError, match=r"^--repo someone/x: the token is 'me''s, who is not 'someone' nor in"):
        push(tiny_export, "someone/x", api=hub)
    assert hub.repos == [] and hub.commits == []
    push(tiny_export, "my-lab/x", api=hub)  # an organisation of the token's user
    assert [r for r, _ in hub.repos] == ["my-lab/x"]


def _offline_hub_env(tmp_path, **extra):
    """No hub: a closed loopback port for its address (refused at once, here or on a machine with network),
    no token, an empty cache."""
    from helpers import child_env

    env = child_env(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"), **extra)
    env.pop("HF_TOKEN", None)
    return env


def test_the_hub_offline_is_one_line_within_seconds_for_every_command(tiny_export, tmp_path):
    """push, a hub dataset in `data check` and in training, and `eval --mteb` used to print 48-78 traceback
    lines, after up to 36 s of retries, with no network or with HF_HUB_OFFLINE set."""
    import os
    import time

    from helpers import ROOT, run_child

    cli = ["-m", "autoregembed.tools.cli"]
    cases = [
        (cli + ["push", "--model", tiny_export, "--repo", "me/x"], {},
         "autoregembed: error: push to me/x: the token: no token"),
        (cli + ["push", "--model", tiny_export, "--repo", "me/x", "--token", "hf_fake"], {},
         "autoregembed: error: push to me/x: the token: the hub could not be reached (ConnectError"),
        (cli + ["push", "--model", tiny_export, "--repo", "me/x"], {"HF_HUB_OFFLINE": "1"},
         "autoregembed: error: push to me/x: HF_HUB_OFFLINE is set"),
        (cli + ["data", "check", "someone/some-nli", "--stage", "2"], {},
         "autoregembed: error: someone/some-nli: no such file or folder, so it was read as a Hugging Face hub "
         "dataset: the hub could not be reached"),
        (cli + ["data", "check", "someone/some-nli", "--stage", "2"], {"HF_HUB_OFFLINE": "1"},
         "autoregembed: error: someone/some-nli: no such file or folder, so it was read as a Hugging Face hub "
         "dataset: HF_HUB_OFFLINE is set, and it is not in the local cache"),
        (["train.py", "--set", "data.stage2=someone/some-nli", "--set", f"output_dir={tmp_path / 'run'}"], {},
         "autoregembed: error: someone/some-nli: no such file or folder, so it was read as a Hugging Face hub "
         "dataset: the hub could not be reached"),
        (cli + ["eval", "--model", tiny_export, "--mteb", "STS12"], {},
         "autoregembed: error: --mteb STS12: its data mteb/sts12-sts: the hub could not be reached"),
        (cli + ["eval", "--model", tiny_export, "--mteb", "STS12"], {"HF_HUB_OFFLINE": "1"},
         "autoregembed: error: --mteb STS12: its data mteb/sts12-sts: HF_HUB_OFFLINE is set"),
    ]
    start = time.time()  # the same interpreter start and imports with nothing to reach: the machine's pace now
    run_child(cli + ["data", "check", os.path.join(ROOT, "autoregembed", "resources", "nli_sample.jsonl"),
                     "--stage", "2"], env=_offline_hub_env(tmp_path), timeout=120, cwd=ROOT)
    local = time.time() - start
    for args, extra, want in cases:
        start = time.time()
        r = run_child(args, env=_offline_hub_env(tmp_path, **extra), timeout=120, cwd=ROOT)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert r.stderr.strip().splitlines()[-1].startswith(want), (args, r.stderr[-2000:])
        # no retries: the retry schedule alone is 36 s, beyond a loaded machine's start-up noise
        assert "Traceback" not in r.stderr and time.time() - start < 3 * local + 15, (args, local)
    assert not (tmp_path / "run").exists()


def _adapter_export(tiny_export, out):
    """LoRA adapters (random B, so they change the model) over ``tiny_export``, exported alone."""
    import torch

    from autoregembed.ground.lora import add_lora
    from autoregembed.release.encoder import _load
    from autoregembed.release.export import export_adapter
    from autoregembed.release.meta import ExportMeta
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    encoder = add_lora(_load(tiny_export, "cpu", torch.float32), 4, 0.0, 0.0, "q_proj,v_proj")
    for name, p in encoder.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return export_adapter(encoder, AutoTokenizer.from_pretrained(tiny_export), str(out), ExportMeta.read(tiny_export),
                          tiny_export)


def test_an_adapter_export_is_pushed_naming_its_bases_repository(tiny_export, tmp_path, capsys):
    """Adapters name the export they sit on by its local path: push refuses them until --base-repo names that
    export's repository, and uploads every file as it is but adapter_config.json, which names it; a whole
    model has no base to name; --adapter without adapters beside the export is one line."""
    import os

    import pytest

    from autoregembed.ground.errors import InputError
    from autoregembed.release.push import export_files, push
    from autoregembed.tools.cli import main

    adapter = _adapter_export(tiny_export, tmp_path / "stage2" / "adapter")
    hub = RecordingHub()
    with pytest.raises(InputError, match=r"sit on the local export .*push that export first .*--base-repo"):
        push(adapter, "me/adapters", api=hub)
    with pytest.raises(InputError, match=r"--base-repo: 'base' is not a Hub repository id"):
        push(adapter, "me/adapters", api=hub, base_repo="base")
    with pytest.raises(InputError, match="is a whole model, not an adapter export"):
        push(tiny_export, "me/adapters", api=hub, base_repo="me/base")
    assert hub.commits == []  # nothing sent before every check passed
    push(adapter, "me/adapters", api=hub, base_repo="me/base")
    (repo, files, _), = hub.commits
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "me/base"
    assert {"adapter_model.safetensors", "modules.json", "autoregembed.json", CARD_FILE} <= set(files)
    for name in export_files(adapter):
        if name != "adapter_config.json":
            assert files[name] == open(os.path.join(adapter, name), "rb").read()
    assert main(["push", "--model", tiny_export, "--adapter", "--repo", "me/x"]) == 2
    assert "--adapter: no adapter export beside" in capsys.readouterr().err
