"""``autoregembed push``: an export to a Hugging Face Hub model repository, in one commit.

The repository gets every file of the export as it is, and a model card rendered for the repository
(its usage code loads the repository id, not the local folder; model_card.py).  Nothing is copied
locally: the files are read where they are.
"""
from __future__ import annotations

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


def push(folder: str, repo_id: str, private: bool = False, revision: str | None = None, token: str | None = None,
         api=None, commit_message: str | None = None) -> str:
    """Create ``repo_id`` if needed and commit the export in ``folder`` to it; returns the commit URL.
    ``api``: a ``huggingface_hub.HfApi`` (its endpoint and token), made here when None."""
    meta = ExportMeta.read(folder)  # not an export: fails before anything is sent
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise InputError(f"--repo: {repo_id!r} is not a Hub repository id (owner/name)")
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
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(folder, f))
                      for f in export_files(folder)]
        operations.append(CommitOperationAdd(path_in_repo=CARD_FILE,
                                             path_or_fileobj=card_text(repo_id, meta).encode("utf-8")))
        info = api.create_commit(repo_id, operations, repo_type="model", revision=revision,
                                 commit_message=commit_message or f"autoregembed {meta.stage or 'export'}")
    return getattr(info, "commit_url", str(info))
