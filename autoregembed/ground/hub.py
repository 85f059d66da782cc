"""The Hugging Face Hub, asked once and quickly, and every way it can fail as one line.

Cluster nodes are often offline.  A hub name (a base model, a dataset, an MTEB task's data, a push)
is checked before anything long starts: with ``HF_HUB_OFFLINE`` set nothing is asked (only the local
cache counts), else one request with a short timeout answers.  Any failure after that (no network,
no such repository, no token, no access) becomes a ``HubError`` naming what asked, never a
traceback after half a minute of retries.
"""
from __future__ import annotations

import contextlib
import os

from .errors import UserError

TIMEOUT_S = 10.0  # one request's answer; no network fails at once, a slow hub within this


class HubError(UserError, ConnectionError):
    """The hub could not answer what a key or flag asked of it; the message names both."""


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (as huggingface_hub reads it): only the local cache may be used."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _is_hub_failure(e: BaseException) -> bool:
    from huggingface_hub import errors

    hub = (errors.HfHubHTTPError, errors.OfflineModeIsEnabled, errors.LocalTokenNotFoundError,
           errors.LocalEntryNotFoundError, errors.RepositoryNotFoundError, errors.HFValidationError)
    transport = type(e).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3", "httpcore")
    return isinstance(e, (*hub, ConnectionError, TimeoutError)) or transport


def reason(e: BaseException) -> str:
    """What the user can act on, in a few words (no URL-length bodies)."""
    from huggingface_hub import errors

    if isinstance(e, errors.LocalTokenNotFoundError):
        return "no token (pass --token, set HF_TOKEN or run `hf auth login`)"
    if isinstance(e, errors.RepositoryNotFoundError):
        return "no such repository, or no access to it with this token"
    if isinstance(e, errors.OfflineModeIsEnabled) or offline():
        return "HF_HUB_OFFLINE is set, and it is not in the local cache"
    status = getattr(getattr(e, "response", None), "status_code", None)
    text = (str(e).splitlines() or [""])[0][:160]
    if status in (401, 403):
        return f"the hub refused this token ({status}: {text})"
    kind = "the hub answered" if status else "the hub could not be reached"
    return (f"{kind} ({type(e).__name__}: {text}); on a node without network set HF_HUB_OFFLINE=1 and use "
            f"what is cached, or a local folder")


@contextlib.contextmanager
def answering(what: str, error=HubError):
    """Within it, a hub failure (``_is_hub_failure``) is raised as ``error`` naming ``what`` (a key or
    flag and the name it gave); anything else passes through untouched."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if not _is_hub_failure(e):
            raise
        raise error(f"{what}: {reason(e)}") from None


def check_repo(repo_id: str, repo_type: str, what: str, error=HubError):
    """``repo_id`` (a "model" or "dataset") is known to the hub: one request within ``TIMEOUT_S``.
    Offline, nothing is asked (the caller reads the cache, and says so when it is not there)."""
    if offline():
        return
    from huggingface_hub import HfApi

    with answering(what, error):
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=TIMEOUT_S)
