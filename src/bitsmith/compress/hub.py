"""Publishing a compressed folder on the Hugging Face Hub, through `huggingface_hub`'s own client.

`push_folder(folder, repo_id)`:
1. regenerates the model card when it is bitsmith's (or missing), so figures measured since compress show up;
2. refuses a folder that fails its integrity check (`integrity.check_folder`) or that would publish an access
   token or a path of this machine (`find_leaks`);
3. creates the repo if missing (pushing into an existing one is fine) and the branch when `revision` names one;
4. compares every local file with the remote tree (size, then sha256 for LFS files / git blob id for the others)
   and commits only what differs, in one commit; weight files that the folder no longer has (an old shard layout)
   are deleted in the same commit, other remote files are left alone. An unchanged folder makes no commit at all.
5. retries a failed attempt (server errors, dropped connections) a bounded number of times; the client itself
   retries each request with backoff. Large files already stored on the Hub are not sent again (LFS: the batch
   endpoint reports them present; Xet: chunks are deduplicated), so re-running an interrupted push resumes it.

The token comes from `token=`, else huggingface_hub's standard places (HF_TOKEN, then the `hf auth login` file).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .card import CARD_FILE, is_generated_card, parse_front_matter, write_model_card
from .errors import BitsmithError, CheckpointError
from .integrity import check_folder

RETRY_WAITS_S = (2.0, 10.0, 30.0)  # between whole-push attempts (the client also retries each request)
_sleep = time.sleep  # tests replace it

# Remote files with these endings are weights: when the local folder no longer has them, the push deletes them,
# so that an old shard layout cannot shadow the new one (e.g. a stale index beside a new single file).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")
# Files scanned for secrets and local paths: what bitsmith and transformers write (not tokenizer vocabularies).
_SCANNED_SUFFIXES = (".json", ".yaml", ".yml", ".md", ".txt", ".cfg", ".toml")
_UNSCANNED_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "spiece")
_SCAN_MAX_BYTES = 8 << 20
_TOKEN_RE = re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}")
_HOME_RE = re.compile(r"(?:/home/[^/\s\"']+|/Users/[^/\s\"']+|/root/)")
# Absolute paths inside text: POSIX (/a/b), home-relative (~/a), Windows (C:\a, escaped or not). URLs are not.
_ABS_RE = re.compile(r"(?<![\w.:/~\\-])(?:/[\w.~-][^\s\"'<>|;,)\]}]*|~/[^\s\"'<>|;,)\]}]*"
                     r"|[A-Za-z]:\\[^\s\"'<>|;,)\]}]*)")


class PushResult(str):
    """The URL of the pushed repo (a str), with what the push did."""

    uploaded: list[str]
    deleted: list[str]
    unchanged: list[str]
    commit_url: str | None

    def __new__(cls, url: str, uploaded=(), deleted=(), unchanged=(), commit_url=None):
        obj = super().__new__(cls, url)
        obj.uploaded, obj.deleted, obj.unchanged = list(uploaded), list(deleted), list(unchanged)
        obj.commit_url = commit_url
        return obj


@dataclass
class _Plan:
    upload: list[str]
    delete: list[str]
    unchanged: list[str]


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
                token: str | None = None, endpoint: str | None = None, commit_message: str | None = None,
                *, retries: int = 2, regenerate_card: bool = True) -> PushResult:
    """Publish `folder` as the model repo `repo_id` (ORG/NAME); return its URL (a `PushResult`).

    `private` applies when the repo is created (an existing repo keeps its visibility). `revision`: a branch,
    created from main if missing (default: main). `endpoint`: the Hub's URL (default: HF_ENDPOINT or
    huggingface.co). `retries`: extra whole-push attempts after a server error or a dropped connection.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder (expected a folder made by `bitsmith compress`)")
    _check_repo_id(repo_id)
    if revision is not None and (not revision.strip() or revision.startswith(("/", "-")) or ".." in revision):
        raise BitsmithError(f"--revision {revision!r}: not a valid branch name")
    if retries < 0:
        raise BitsmithError(f"retries={retries}: must be 0 or more")

    check_folder(folder)
    if regenerate_card and _card_is_ours(folder):
        write_model_card(folder, repo_id=repo_id)
    leaks = find_leaks(folder, token=token or _stored_token())
    if leaks:
        listed = "\n".join(f"  - {x}" for x in leaks[:20])
        raise CheckpointError(
            f"{folder}: refusing to push: these files would publish private information:\n{listed}\n"
            "Remove it from those files (recipes should name calibration files relative to where you run bitsmith)."
        )

    api = HfApi(endpoint=endpoint, token=token, library_name="bitsmith", library_version=_version())
    context = _ErrorContext(api.endpoint, repo_id, token)
    url = None
    last: Exception = RuntimeError("no attempt was made")
    for attempt in range(retries + 1):
        if attempt:
            _sleep(RETRY_WAITS_S[min(attempt - 1, len(RETRY_WAITS_S) - 1)])
        doing = "creating the repository" if url is None else "uploading"
        try:
            if url is None:
                # private=None (not False) when not asked: a new repo then gets its namespace's default visibility
                repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
                if revision not in (None, "main"):
                    api.create_branch(repo_id, branch=revision, exist_ok=True)
                url = str(repo_url).rstrip("/") + (f"/tree/{revision}" if revision not in (None, "main") else "")
            plan = _plan(api, folder, repo_id, revision)
            if not plan.upload and not plan.delete:
                return PushResult(url, unchanged=plan.unchanged)
            info = _commit(api, folder, repo_id, revision, plan, commit_message)
            return PushResult(url, plan.upload, plan.delete, plan.unchanged, getattr(info, "commit_url", None))
        except _client_errors() as e:  # each becomes one clear BitsmithError; bugs stay tracebacks
            if url is None and _is_connect(e):
                raise context.translate(e, doing) from None  # nothing listens there: retrying will not help
            if not _retriable(e):
                raise context.translate(e, doing) from None
            last = e
    raise context.translate(last, "uploading", attempts=retries + 1) from None


def _client_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises for Hub-side trouble: HTTP errors, transport errors (httpx2 or requests,
    depending on its version; both derive from these or from OSError), ValueError for responses or metadata it
    rejects, and RuntimeError, in which it wraps a failed LFS upload."""
    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, OSError, ValueError, RuntimeError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _check_repo_id(repo_id: str) -> None:
    ok = (isinstance(repo_id, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}", repo_id) is not None
          and ".." not in repo_id and "--" not in repo_id and not repo_id.endswith((".", "-")))
    if not ok:
        raise BitsmithError(
            f"{repo_id!r}: not a Hub repo id; expected ORG/NAME (letters, digits, '-', '_', '.'; no '--' or '..')"
        )


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:
        return "unknown"


def _stored_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - a broken token file is the client's business, not the scan's
        return None


def _card_is_ours(folder: Path) -> bool:
    """Regenerate when there is no README, or it is bitsmith's, or it is not about a bitsmith model (a base card)."""
    path = folder / CARD_FILE
    if not path.is_file():
        return True
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    meta, _ = parse_front_matter(text)
    return is_generated_card(text) or meta.get("library_name") != "bitsmith"


# --- what to send -------------------------------------------------------------------------------------------------
def local_files(folder: Path) -> list[str]:
    """Files a push sends, relative POSIX paths: everything but hidden files/folders and caches."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        if p.is_file():
            out.append(rel.as_posix())
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git_blob_id(path: Path) -> str:
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same(path: Path, remote) -> bool:
    if remote.size != path.stat().st_size:
        return False
    if remote.lfs is not None:
        return _sha256(path) == remote.lfs.sha256
    return _git_blob_id(path) == remote.blob_id


def _remote_files(api, repo_id: str, revision: str | None) -> dict:
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        return {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=revision)
                if hasattr(f, "blob_id")}
    except (RevisionNotFoundError, EntryNotFoundError):
        return {}  # an empty repo has no tree yet


def _plan(api, folder: Path, repo_id: str, revision: str | None) -> _Plan:
    remote = _remote_files(api, repo_id, revision)
    mine = local_files(folder)
    upload, unchanged = [], []
    for rel in mine:
        (unchanged if rel in remote and _same(folder / rel, remote[rel]) else upload).append(rel)
    stale = sorted(p for p in remote if p not in set(mine) and p.endswith(_WEIGHT_SUFFIXES))
    return _Plan(upload, stale, unchanged)


def _commit(api, folder: Path, repo_id: str, revision: str | None, plan: _Plan, message: str | None):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in plan.upload]
    ops += [CommitOperationDelete(path_in_repo=rel) for rel in plan.delete]
    summary = message or f"Upload model compressed with bitsmith ({len(plan.upload)} files)"
    details = [f"- {rel}" for rel in plan.upload] + [f"- delete {rel} (no longer part of the model)"
                                                     for rel in plan.delete]
    return api.create_commit(repo_id, ops, commit_message=summary, commit_description="\n".join(details),
                             revision=revision)


# --- secrets and paths --------------------------------------------------------------------------------------------
def find_leaks(folder: str | os.PathLike, token: str | None = None) -> list[str]:
    """Lines of the folder's config-like files that hold an access token or a path of this machine.

    Scanned: README.md and the JSON/YAML/text files bitsmith and transformers write (tokenizer vocabularies are
    not: their entries are data). A path is local when it is home-relative (~/...), a Windows drive path, a home
    folder (/home/x, /Users/x, /root/), or an absolute path whose first two components exist on this machine.
    """
    folder = Path(folder)
    found = []
    for rel in local_files(folder):
        name = rel.rsplit("/", 1)[-1]
        if not name.endswith(_SCANNED_SUFFIXES) or name.startswith(_UNSCANNED_PREFIXES):
            continue
        path = folder / rel
        if path.stat().st_size > _SCAN_MAX_BYTES:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            if (token and len(token) >= 8 and token in line) or _TOKEN_RE.search(line):
                found.append(f"{rel}, line {lineno}: an access token (hf_...)")
                continue
            hit = next((m.group(0) for m in _ABS_RE.finditer(line) if _is_local_path(m.group(0))), None)
            if hit is not None:
                found.append(f"{rel}, line {lineno}: a local path ({_shorten(hit)})")
    return found


def _is_local_path(candidate: str) -> bool:
    if candidate.startswith("~/") or re.match(r"[A-Za-z]:\\", candidate) or _HOME_RE.match(candidate):
        return True
    parts = [p for p in candidate.split("/") if p]
    if len(parts) < 2:
        return False
    try:
        return Path("/", parts[0], parts[1]).exists()
    except OSError:
        return False


def _shorten(path: str) -> str:
    return path if len(path) <= 80 else path[:77] + "..."


# --- errors -------------------------------------------------------------------------------------------------------
def _status(e: BaseException) -> int | None:
    for err in _chain(e):
        response = getattr(err, "response", None)
        code = getattr(response, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _is_transport(e: BaseException) -> bool:
    names = {"TransportError", "NetworkError", "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout",
             "RemoteProtocolError", "TimeoutException", "ReadError", "WriteError", "ConnectionError"}
    return any(isinstance(err, (ConnectionError, TimeoutError)) or names & {c.__name__ for c in type(err).__mro__}
               for err in _chain(e))


def _is_connect(e: BaseException) -> bool:
    return any(isinstance(err, ConnectionRefusedError)
               or {"ConnectError", "ConnectTimeout"} & {c.__name__ for c in type(err).__mro__} for err in _chain(e))


def _retriable(e: BaseException) -> bool:
    code = _status(e)
    if code is not None:
        return code >= 500 or code in (408, 429)
    return _is_transport(e)


class _ErrorContext:
    def __init__(self, endpoint: str, repo_id: str, token: str | None):
        self.endpoint, self.repo_id, self.token = endpoint, repo_id, token

    def translate(self, e: BaseException, doing: str, attempts: int | None = None) -> BitsmithError:
        code = _status(e)
        root = next((err for err in _chain(e) if getattr(err, "response", None) is not None), e)
        if code is None and _is_connect(e) and attempts is None:
            return BitsmithError(
                f"cannot reach the Hub at {self.endpoint} ({_short(e)}); check the network connection, or"
                " HF_ENDPOINT if you use a mirror"
            )
        if code == 401:
            how = ("the token was refused" if (self.token or _stored_token())
                   else "no token found")
            return BitsmithError(
                f"not authorised by the Hub at {self.endpoint} ({how}) while {doing} {self.repo_id}: run"
                " `hf auth login` (`huggingface-cli login` in older versions) or set HF_TOKEN to a token with"
                " write access"
            )
        if code == 403:
            return BitsmithError(
                f"the Hub at {self.endpoint} refused to let this token write to {self.repo_id} (HTTP 403): use a"
                " token with write access to that namespace"
            )
        if code == 404:
            return BitsmithError(f"{self.repo_id}: repository or branch not found on {self.endpoint} while {doing}"
                                 f" ({_short(root)})")
        if attempts is not None:
            what = f"HTTP {code}" if code is not None else _short(e)
            return BitsmithError(
                f"pushing to {self.repo_id} at {self.endpoint} failed after {attempts} attempt"
                f"{'s' if attempts > 1 else ''} ({what}); files that reached the Hub are kept and will not be sent"
                " again: run the same command later to resume"
            )
        if code is not None:
            return BitsmithError(f"the Hub at {self.endpoint} answered HTTP {code} while {doing} {self.repo_id}:"
                                 f" {_short(root)}")
        if isinstance(e, ValueError):  # the client's own checks (e.g. README metadata the Hub rejects)
            return BitsmithError(f"the Hub client refused the push of {self.repo_id}: {_short(e)}")
        return BitsmithError(f"pushing to {self.repo_id} at {self.endpoint} failed while {doing}: {_short(e)}")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
