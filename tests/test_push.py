"""autoregembed push: one commit with every file of the export and a card rendered for the repository,
against a recording stand-in for the Hub's API (no network here)."""
import json


from autoregembed.release.model_card import CARD_FILE


class RecordingHub:
    """The two HfApi calls push makes, recorded; the uploaded bytes read as the Hub would."""

    def __init__(self):
        self.repos, self.commits = [], []

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
