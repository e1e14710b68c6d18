"""Models by Hugging Face Hub id: `ORG/NAME[@revision]` becomes a local snapshot directory.

Downloads go through `huggingface_hub.snapshot_download`, so they resume, show progress bars, read `HF_TOKEN`,
land in the standard cache (`HF_HOME` / `HF_HUB_CACHE`) and honour `HF_HUB_OFFLINE` (then only the cache is read).
Afterwards every command sees an ordinary directory. A local path that exists always wins over a hub id.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from vptq_mlc.errors import HubError

log = logging.getLogger(__name__)

# ORG/NAME with hub-legal names (letters, digits, - _ .), optionally @revision (branch, tag or commit)
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")


def parse_hub_id(source: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `source` reads as a hub id, else None (paths like ./x, /x, ~/x, a/b/c)."""
    m = _HUB_ID.fullmatch(source)
    if m is None or source.startswith((".", "~")) or m["repo"].endswith((".", "-")):
        return None
    return m["repo"], m["revision"]


def resolve_model_source(source: str) -> str:
    """`source` itself when it exists locally or is no hub id; else the local snapshot of the hub repo."""
    parsed = None if Path(source).expanduser().exists() else parse_hub_id(source)
    if parsed is None:
        return source
    repo_id, revision = parsed
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise HubError(f"{source} is no local directory, and fetching it from the Hugging Face Hub needs "
                       "huggingface-hub; pip install huggingface-hub") from None
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        path = snapshot_download(repo_id=repo_id, revision=revision)
    except GatedRepoError:
        raise HubError(f"{where} is gated on the Hugging Face Hub; accept its terms on the website and set "
                       "HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"{source} is neither a local directory nor a Hugging Face Hub model (or it is private: "
                       "set HF_TOKEN); check the path or id") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub; check the branch, tag or "
                       "commit after @") from None
    except LocalEntryNotFoundError:
        raise HubError(f"{where} is not in the Hugging Face cache and cannot be downloaded (offline: "
                       "HF_HUB_OFFLINE is set or the hub is unreachable); download it once online") from None
    except HfHubHTTPError as e:
        raise HubError(f"downloading {where} failed ({str(e).splitlines()[0]}); retry (downloads resume)") from None
    except OSError as e:
        raise HubError(f"downloading {where} failed ({e}); check disk space and HF_HUB_CACHE") from None
    log.info("%s -> %s", where, path)
    return str(path)
