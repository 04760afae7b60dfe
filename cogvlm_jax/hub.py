"""Hugging Face Hub model ids (``THUDM/cogvlm2-llama3-chat-19B``) -> a local snapshot directory.

Everything that takes a checkpoint or tokenizer path (``cogvlm_jax.load``, ``cogvlm-jax convert`` and the
CLI verbs) passes it through :func:`resolve` first: a path that exists locally is returned as it is (a
local directory wins over a Hub id of the same spelling); an ``org/name`` id is looked up with
``huggingface_hub`` in the Hugging Face cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``) and,
when the files we read are not all there and ``HF_HUB_OFFLINE`` is not set, downloaded into it, with
``huggingface_hub``'s progress bars and retries (run again after an interruption, only the files not yet
cached are fetched).

Only the files we read are fetched (:data:`MODEL_FILES`): configs, safetensors weights and their index, the
tokenizer files, and the files of our own converted format. Pickled PyTorch weights (``*.bin``) never are:
a snapshot without safetensors is refused by the checkpoint reader, or here when the Hub lists only
pickle weights. An id that cannot be resolved is a :class:`HubError` in one line that says why (offline
and not cached, no such repo or revision, a gated repo, no network) and what to run.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from typing import Optional

from cogvlm_jax.files import CheckpointError

# The files a model snapshot is fetched with: what ``load`` and ``convert`` read (configs, safetensors and
# their index, the tokenizer) or carry through a conversion (``convert_hf.CARRIED_FILES``: the published
# remote code, copied, never run), and our own converted format. tests/test_hub.py checks the lists.
CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MODEL_FILES = CONFIG_FILES + TOKENIZER_FILES + (
    "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "configuration_cogvlm.py", "modeling_cogvlm.py", "visual.py", "util.py",
    "checkpoint.json", "params/*",  # a cogvlm-jax checkpoint pushed to the Hub (fnmatch's * spans folders)
)
PICKLE_FILES = ("*.bin", "*.pt", "*.pth", "*.ckpt")  # published, never fetched
KINDS = {"model": MODEL_FILES, "tokenizer": TOKENIZER_FILES, "config": CONFIG_FILES}

# ``org/name`` as the Hub spells repo ids: letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
LOGIN = "`hf auth login` (or set HF_TOKEN)"


class HubError(CheckpointError):
    """A Hub id that cannot be resolved; the message says which case it is and what to run."""


def is_hub_id(name: str) -> bool:
    """True for a string spelled like a Hub repo id ``org/name`` (whether or not the repo exists)."""
    return bool(_REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name and not name.endswith(".")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, else as ``huggingface_hub`` read it at
    import: a notebook that sets the variable after importing is offline too."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(var)
        if value is not None:
            return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    """The Hugging Face cache: ``HF_HUB_CACHE`` as set now, else ``huggingface_hub``'s default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def complete(folder: str, kind: str = "model") -> bool:
    """True when the snapshot ``folder`` holds everything a ``kind`` needs: a model its config.json and
    weights (one safetensors file, or an index and every shard it names, or our ``params/``), a tokenizer
    its vocabulary, a config its config.json."""
    def has(name):
        return os.path.isfile(os.path.join(folder, name))

    if kind == "tokenizer":
        return has("tokenizer.model") or has("tokenizer.json")
    if not has("config.json"):
        return False
    if kind == "config":
        return True
    if os.path.isdir(os.path.join(folder, "params")) or has("model.safetensors"):
        return True
    if not has("model.safetensors.index.json"):
        return False
    try:
        with open(os.path.join(folder, "model.safetensors.index.json")) as f:
            shards = set(json.load(f)["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True  # the checkpoint reader names what is wrong with the index
    return all(has(s) for s in shards)


def _where(repo_id: str, revision: Optional[str]) -> str:
    return repo_id if revision is None else f"{repo_id} (revision {revision!r})"


def _cached(repo_id: str, revision: Optional[str], kind: str) -> Optional[str]:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (default main), or None if none is cached.
    The snapshot may lack files (see :func:`complete`)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(), local_files_only=True,
                                 allow_patterns=list(KINDS[kind]))
    except LocalEntryNotFoundError as e:
        # a snapshot that lacks files the Hub's listing (cached beside it) names is IncompleteSnapshotError,
        # which says where it is: what it holds is judged by ``complete``
        folder = getattr(e, "snapshot_path", None)
        return folder if folder and os.path.isdir(folder) else None


def _download(repo_id: str, revision: Optional[str], kind: str, progress: bool) -> str:
    """Fetch the ``kind`` files of ``repo_id`` that the cache lacks; the snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    kw = {}
    if not progress:
        from tqdm.auto import tqdm

        class Silent(tqdm):
            def __init__(self, *a, **k):
                super().__init__(*a, **{**k, "disable": True})

        kw["tqdm_class"] = Silent
    where = _where(repo_id, revision)
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(),
                                 allow_patterns=list(KINDS[kind]), **kw)
    except GatedRepoError:
        raise HubError(f"{repo_id} is a gated repo on the Hugging Face Hub: accept its terms at "
                       f"https://huggingface.co/{repo_id} and log in with {LOGIN}") from None
    except RepositoryNotFoundError:
        raise HubError(f"no local directory {repo_id} and no model {repo_id} on the Hugging Face Hub (a private "
                       f"repo needs {LOGIN})") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        raise HubError(f"no local directory {repo_id}, and the Hugging Face Hub cannot be reached for {where} nor is "
                       f"it in the cache {cache_dir()}: check the network, or download it where there is one "
                       "(`hf download ...`) and copy the cache") from None
    except HfHubHTTPError as e:
        raise HubError(f"the Hugging Face Hub refused {where}: {str(e).splitlines()[0]}") from None


def _pickle_only(repo_id: str, revision: Optional[str]) -> list[str]:
    """The pickle weight files the Hub lists for ``repo_id`` (asked only when a snapshot came without weights)."""
    from huggingface_hub import HfApi

    try:
        names = HfApi().list_repo_files(repo_id, revision=revision)
    except Exception:  # the listing only improves the message; the reader's own error follows without it
        return []
    return sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in PICKLE_FILES))


def resolve(path: Optional[str], revision: Optional[str] = None, *, kind: str = "model",
            progress: bool = True) -> Optional[str]:
    """A local directory for ``path``: ``path`` itself if it exists here (or is not spelled like a Hub id,
    so that the caller's own "not found" error names it); a Hub id's snapshot folder in the cache,
    downloaded first if it lacks files we read and ``HF_HUB_OFFLINE`` is not set.

    ``revision``: a branch, tag or commit of the Hub repo (default ``main``); refused for a local path.
    ``kind``: ``"model"`` (weights, config, tokenizer), ``"tokenizer"`` or ``"config"``: what to fetch.
    ``progress``: ``huggingface_hub``'s download bars. None stays None.
    """
    if path is None:
        if revision is not None:
            raise HubError(f"revision {revision!r} given without a Hub model id")
        return None
    path = os.fspath(path)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if os.path.exists(path) or not is_hub_id(path):
        if revision is not None:
            raise HubError(f"revision {revision!r} applies to Hub model ids; {path} is "
                           f"{'a local path' if os.path.exists(path) else 'not a Hub id (org/name)'}")
        return path
    folder = _cached(path, revision, kind)
    if folder is not None and complete(folder, kind):
        return folder
    where = _where(path, revision)
    if not offline():
        folder = _download(path, revision, kind, progress)
    elif folder is None:
        raise HubError(f"{where} is not a local directory and not in the Hugging Face cache {cache_dir()}, and "
                       "HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE to fetch it, or pass a local "
                       "directory")
    if kind != "tokenizer" and not os.path.isfile(os.path.join(folder, "config.json")):
        raise HubError(f"{where} has no config.json: it is not a model checkpoint in the Hugging Face layout")
    if kind == "model" and not complete(folder, kind) and not offline():
        pickles = _pickle_only(path, revision)
        if pickles:
            raise HubError(f"{where} publishes PyTorch pickle weights ({', '.join(pickles[:4])}) and no safetensors; "
                           "cogvlm-jax never unpickles (it can run arbitrary code): convert them once to "
                           "safetensors with PyTorch (docs/hub.md)")
    # an incomplete snapshot (offline, or weights the reader will name as missing) goes to the reader, which
    # says what is missing and refuses pickle weights as it does in any directory
    return folder
