"""``autoregembed push``: an export to a Hugging Face Hub model repository, in one commit.

The repository gets every file of the export as it is, and a model card rendered for the repository
(its usage code loads the repository id, not the local folder; model_card.py).  Nothing is copied
locally: the files are read where they are.  An adapter export (export.export_adapter) names the export
it sits on by its local path: pushed, it names that export's repository instead (``base_repo``), so the
adapter loads from the Hub as it loaded here.
"""
from __future__ import annotations

import json
import os

from ..ground import hub
from ..ground.errors import InputError
from .meta import ExportMeta
from .model_card import CARD_FILE, card_text


def export_files(folder: str) -> list[str]:
    """The export's files, relative to it (every file below it but the card, which is rendered anew)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out += [os.path.relpath(os.path.join(root, f), folder) for f in sorted(files)]
    return [f for f in out if f != CARD_FILE]


ADAPTER_CONFIG = "adapter_config.json"


def _repo_id(value: str, flag: str) -> str:
    parts = value.split("/")
    if len(parts) != 2 or not all(parts):
        raise InputError(f"{flag}: {value!r} is not a Hub repository id (owner/name)")
    return value


def _adapter_config(folder: str, base_repo: str | None) -> bytes | None:
    """An adapter export's adapter_config.json as it is pushed (naming ``base_repo``); None for a whole model."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        if base_repo:
            raise InputError(f"--base-repo: {folder} is a whole model, not an adapter export; it has no base to name")
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    base = config.get("base_model_name_or_path") or ""
    if base_repo is None and (os.path.isabs(base) or os.path.exists(base)):
        raise InputError(f"{path}: the adapters sit on the local export {base}; push that export first and name its "
                         f"repository with --base-repo owner/name")
    config["base_model_name_or_path"] = _repo_id(base_repo, "--base-repo") if base_repo else base
    return (json.dumps(config, indent=2) + "\n").encode("utf-8")


def push(folder: str, repo_id: str, private: bool = False, revision: str | None = None, token: str | None = None,
         api=None, commit_message: str | None = None, base_repo: str | None = None) -> str:
    """Create ``repo_id`` if needed and commit the export in ``folder`` to it; returns the commit URL.
    ``api``: a ``huggingface_hub.HfApi`` (its endpoint and token), made here when None.  ``base_repo``: for an
    adapter export, the repository of the export its adapters sit on."""
    meta = ExportMeta.read(folder)  # not an export: fails before anything is sent
    _repo_id(repo_id, "--repo")
    adapter_config = _adapter_config(folder, base_repo)
    from huggingface_hub import CommitOperationAdd, HfApi

    if hub.offline():
        raise hub.HubError(f"push to {repo_id}: HF_HUB_OFFLINE is set; push from a machine with network")
    api = api or HfApi(token=token)
    with hub.answering(f"push to {repo_id}: the token"):  # no token, a revoked one, no network: before any upload
        user = api.whoami()
    owner = repo_id.split("/")[0]
    if owner not in {user.get("name"), *(o.get("name") for o in user.get("orgs", []))}:
        raise hub.HubError(f"--repo {repo_id}: the token is {user.get('name')!r}'s, who is not {owner!r} nor in that "
                           f"organisation")
    with hub.answering(f"push to {repo_id}"):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=adapter_config if f == ADAPTER_CONFIG
                                         else os.path.join(folder, f)) for f in export_files(folder)]
        operations.append(CommitOperationAdd(path_in_repo=CARD_FILE,
                                             path_or_fileobj=card_text(repo_id, meta).encode("utf-8")))
        info = api.create_commit(repo_id, operations, repo_type="model", revision=revision,
                                 commit_message=commit_message or f"autoregembed {meta.stage or 'export'}")
    return getattr(info, "commit_url", str(info))
