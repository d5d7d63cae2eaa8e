"""A local stand-in for the part of the Hugging Face Hub API that `huggingface_hub`'s upload path calls.

Started by a test on 127.0.0.1 (port chosen by the OS), it answers the real client (`HfApi`): repo create, repo
info, branch create, tree listing (paginated), README metadata validation, preupload (upload modes and remote
oids), the LFS batch API (basic transfer, or multipart above `multipart_chunk` bytes), LFS uploads and verify, and
the ndjson commit. It records every request and keeps what arrived, so tests check bytes, not mocks. Faults can be
injected per method and path (`fail`). Xet is not implemented: tests turn it off in the client (the client then
takes the LFS path, as it does for anyone without `hf_xet`).

Also here: `make_folder`, which writes a tiny compressed-looking model folder (packed `gwint` modules) for tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_THRESHOLD = 64 * 1024  # files at least this big (or binary, or .safetensors) go through LFS
MAX_BODY = 64 << 20
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:  # what the Hub reports as the file's git blob id
        return git_blob_id(lfs_pointer(self.sha256, len(self.data)) if self.lfs else self.data)


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    branches: dict = field(default_factory=lambda: {"main": {}})  # branch -> {path: StoredFile}
    heads: dict = field(default_factory=lambda: {"main": "0" * 40})
    commits: list = field(default_factory=list)  # dicts: branch, oid, summary, added, deleted


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int
    times: int  # how many matching requests still fail; -1 = forever


@dataclass
class Request:
    method: str
    path: str
    status: int
    body_bytes: int


class FakeHub:
    def __init__(self, token: str = "hf_" + "T" * 34, multipart_chunk: int | None = None, tree_page: int = 1000):
        self.token = token
        self.multipart_chunk = multipart_chunk
        self.tree_page = tree_page
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content (the LFS object store)
        self.parts: dict[str, dict[int, bytes]] = {}  # pending multipart uploads
        self.log: list[Request] = []
        self.faults: list[Fault] = []
        self.validated_yaml: list[dict] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- test helpers --------------------------------------------------------------------------------------------
    def fail(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """The next `times` requests (-1: all) with this method whose path matches `path_regex` get `status`."""
        with self.lock:
            self.faults.append(Fault(method.upper(), re.compile(path_regex), status, times))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, private: bool = False) -> Repo:
        repo = Repo(repo_id, private=private)
        self.repos[repo_id] = repo
        if files:
            tree = {p: StoredFile(d, _is_lfs(p, d)) for p, d in files.items()}
            for f in tree.values():
                if f.lfs:
                    self.lfs[f.sha256] = f.data
            repo.branches["main"] = tree
            repo.heads["main"] = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
            repo.commits.append({"branch": "main", "oid": repo.heads["main"], "summary": "initial",
                                 "added": sorted(files), "deleted": []})
        return repo

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return {p: f.data for p, f in self.repos[repo_id].branches[branch].items()}

    def requests(self, method: str | None = None, path_regex: str | None = None) -> list[Request]:
        with self.lock:
            return [r for r in self.log if (method is None or r.method == method)
                    and (path_regex is None or re.search(path_regex, r.path))]

    def lfs_uploads(self) -> list[Request]:
        """Successful requests that carried LFS content (basic PUTs and multipart part PUTs)."""
        return [r for r in self.requests("PUT", r"^/lfs/") if r.status == 200]


def _is_lfs(path: str, data: bytes) -> bool:
    return path.endswith((".safetensors", ".bin")) or len(data) >= LFS_THRESHOLD or b"\0" in data[:512]


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers or {}, extra or {}


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end by themselves

    def log_message(self, format, *args):  # quiet
        pass

    # --- plumbing ------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
                if len(out) > MAX_BODY:
                    raise HTTPError(413, "body too large")
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise HTTPError(413, "body too large")
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, payload=None, headers: dict | None = None) -> None:
        data = b"" if payload is None else (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query)
        status = 500
        body = b""
        try:
            body = self._body()
            with hub.lock:
                for fault in hub.faults:
                    if fault.method == method and fault.pattern.search(path) and fault.times != 0:
                        fault.times -= 1 if fault.times > 0 else 0
                        raise HTTPError(fault.status, f"injected failure on {method} {path}")
            status, payload, headers = self._route(method, path, query, body)
        except HTTPError as e:
            status, payload, headers = e.status, {"error": e.message, **e.extra}, e.headers
        except Exception as e:  # a bug in the fake: say so loudly in the response
            status, payload, headers = 500, {"error": f"fakehub bug: {type(e).__name__}: {e}"}, {}
        with hub.lock:
            hub.log.append(Request(method, path, status, len(body)))
        self._send(status, payload, headers)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    # --- auth / lookups ------------------------------------------------------------------------------------------
    def _auth(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            raise HTTPError(401, "Invalid credentials in Authorization header",
                            {"X-Error-Message": "Invalid credentials in Authorization header"})

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise HTTPError(404, f"Repository not found: {repo_id}", {"X-Error-Code": "RepoNotFound"})
        return repo

    def _branch(self, repo: Repo, rev: str) -> dict:
        if rev not in repo.branches:
            raise HTTPError(404, f"Invalid rev id: {rev}", {"X-Error-Code": "RevisionNotFound"})
        return repo.branches[rev]

    # --- routes --------------------------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict, body: bytes):
        hub = self.hub
        if method == "POST" and path == "/api/repos/create":
            self._auth()
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else f"user/{req['name']}"
            with hub.lock:
                if repo_id in hub.repos:
                    raise HTTPError(409, "You already created this model repo", {},
                                    {"url": f"{hub.url}/{repo_id}"})
                private = req.get("visibility") == "private" or req.get("private") is True
                hub.add_repo(repo_id, {".gitattributes": GITATTRIBUTES}, private=private)  # as the Hub does
            return 200, {"url": f"{hub.url}/{repo_id}", "name": repo_id}, {}

        if method == "POST" and path == "/api/validate-yaml":
            self._auth()
            content = json.loads(body)["content"]
            errors = _validate_card(content)
            hub.validated_yaml.append({"content": content, "errors": errors})
            return (400 if errors else 200), {"errors": [{"message": m} for m in errors], "warnings": []}, {}

        m = re.fullmatch(rf"/api/models/{_REPO}(?:/revision/{_REV})?", path)
        if method == "GET" and m:
            self._auth()
            repo = self._repo(m["repo"])
            rev = m["rev"] or "main"
            files = self._branch(repo, rev)
            return 200, {"id": repo.repo_id, "sha": repo.heads[rev], "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(files)]}, {}

        m = re.fullmatch(rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", path)
        if method == "POST" and m:
            self._auth()
            repo = self._repo(m["repo"])
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            with hub.lock:
                if m["branch"] in repo.branches:
                    raise HTTPError(409, "Reference already exists")
                repo.branches[m["branch"]] = dict(self._branch(repo, start))
                repo.heads[m["branch"]] = repo.heads[start]
            return 200, {}, {}

        m = re.fullmatch(rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<sub>.+))?", path)
        if method == "GET" and m:
            self._auth()
            return self._tree(m, query)

        m = re.fullmatch(rf"/api/models/{_REPO}/preupload/{_REV}", path)
        if method == "POST" and m:
            self._auth()
            repo = self._repo(m["repo"])
            files = self._branch(repo, m["rev"])
            out = []
            for f in json.loads(body)["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = _is_lfs(f["path"], sample) or f["size"] >= LFS_THRESHOLD
                have = files.get(f["path"])
                oid = None
                if have is not None:
                    oid = have.sha256 if have.lfs else git_blob_id(have.data)
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
            return 200, {"files": out, "commitOid": repo.heads[m["rev"]]}, {}

        m = re.fullmatch(rf"/{_REPO}\.git/info/lfs/objects/batch", path)
        if method == "POST" and m:
            self._auth()
            self._repo(m["repo"])
            return self._lfs_batch(json.loads(body))

        m = re.fullmatch(r"/lfs/(?P<oid>[0-9a-f]{64})", path)
        if method == "PUT" and m:
            self._store(m["oid"], body)
            return 200, {}, {}

        m = re.fullmatch(r"/lfs/(?P<oid>[0-9a-f]{64})/part/(?P<n>\d+)", path)
        if method == "PUT" and m:
            with hub.lock:
                hub.parts.setdefault(m["oid"], {})[int(m["n"])] = body
            return 200, {}, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}

        m = re.fullmatch(r"/lfs/(?P<oid>[0-9a-f]{64})/complete", path)
        if method == "POST" and m:
            req = json.loads(body)
            with hub.lock:
                parts = hub.parts.pop(m["oid"], {})
            numbers = [p["partNumber"] for p in req["parts"]]
            if numbers != sorted(parts) or any(
                p["etag"] != f'"{hashlib.md5(parts[p["partNumber"]]).hexdigest()}"' for p in req["parts"]
            ):
                raise HTTPError(400, "multipart completion does not match the uploaded parts")
            self._store(m["oid"], b"".join(parts[n] for n in numbers))
            return 200, {}, {}

        if method == "POST" and path == "/lfs/verify":
            req = json.loads(body)
            data = hub.lfs.get(req["oid"])
            if data is None or len(data) != req["size"]:
                raise HTTPError(404, "object not found")
            return 200, {}, {}

        m = re.fullmatch(rf"/api/models/{_REPO}/commit/{_REV}", path)
        if method == "POST" and m:
            self._auth()
            return self._commit(m["repo"], m["rev"], body, query)

        raise HTTPError(404, f"fakehub does not implement {method} {path}")

    def _tree(self, m, query):
        repo = self._repo(m["repo"])
        files = self._branch(repo, m["rev"])
        sub = (m["sub"] or "").strip("/")
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        entries, folders = [], set()
        for p in sorted(files):
            if sub and not p.startswith(sub + "/"):
                continue
            rest = p[len(sub) + 1:] if sub else p
            if "/" in rest and not recursive:
                folders.add((sub + "/" if sub else "") + rest.split("/")[0])
                continue
            f = files[p]
            entry = {"type": "file", "oid": f.oid, "size": len(f.data), "path": p}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data),
                                "pointerSize": len(lfs_pointer(f.sha256, len(f.data)))}
            entries.append(entry)
            if recursive:
                parts = rest.split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    folders.add((sub + "/" if sub else "") + "/".join(parts[:i]))
        entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "path": d} for d in folders]
        if sub and not entries:
            raise HTTPError(404, f"{sub} does not exist", {"X-Error-Code": "EntryNotFound"})
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start:start + self.hub.tree_page]
        headers = {}
        if start + self.hub.tree_page < len(entries):
            nxt = f"{self.hub.url}{urlsplit(self.path).path}?recursive={recursive}&cursor={start + self.hub.tree_page}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        return 200, page, headers

    def _lfs_batch(self, req: dict):
        hub = self.hub
        if req.get("operation") != "upload":
            raise HTTPError(400, "only uploads are implemented")
        objects = []
        multipart_used = False
        for obj in req["objects"]:
            oid, size = obj["oid"], obj["size"]
            if oid in hub.lfs and len(hub.lfs[oid]) == size:
                objects.append({"oid": oid, "size": size})  # already stored: no actions, nothing to send
                continue
            chunk = hub.multipart_chunk
            if chunk and size > chunk and "multipart" in req.get("transfers", []):
                multipart_used = True
                n = -(-size // chunk)
                header = {"chunk_size": str(chunk)}
                header.update({str(i): f"{hub.url}/lfs/{oid}/part/{i}" for i in range(1, n + 1)})
                upload = {"href": f"{hub.url}/lfs/{oid}/complete", "header": header}
            else:
                upload = {"href": f"{hub.url}/lfs/{oid}"}
            objects.append({"oid": oid, "size": size, "authenticated": True,
                            "actions": {"upload": upload, "verify": {"href": f"{hub.url}/lfs/verify"}}})
        return 200, {"transfer": "multipart" if multipart_used else "basic", "objects": objects}, {}

    def _store(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise HTTPError(400, f"content does not hash to {oid}")
        with self.hub.lock:
            self.hub.lfs[oid] = data

    def _commit(self, repo_id: str, rev: str, body: bytes, query: dict):
        hub = self.hub
        if query.get("create_pr"):
            raise HTTPError(400, "fakehub does not implement pull requests")
        repo = self._repo(repo_id)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HTTPError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        with hub.lock:
            files = dict(self._branch(repo, rev))
            added, deleted = [], []
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
                    added.append(value["path"])
                elif key == "lfsFile":
                    data = hub.lfs.get(value["oid"])
                    if data is None:
                        raise HTTPError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    files[value["path"]] = StoredFile(data, lfs=True)
                    added.append(value["path"])
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HTTPError(404, f"A file with this name doesn't exist: {value['path']}",
                                        {"X-Error-Code": "EntryNotFound"})
                    deleted.append(value["path"])
                else:
                    raise HTTPError(400, f"fakehub does not implement commit operation {key!r}")
            if "parentCommit" in header and header["parentCommit"] != repo.heads[rev]:
                raise HTTPError(412, "parent commit is not the head of the branch")
            oid = hashlib.sha1(f"{repo.heads[rev]}{time.time_ns()}{added}{deleted}".encode()).hexdigest()
            repo.branches[rev] = files
            repo.heads[rev] = oid
            repo.commits.append({"branch": rev, "oid": oid, "summary": header["summary"],
                                 "description": header.get("description", ""), "added": added, "deleted": deleted})
        return 200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": None}, {}


def _validate_card(content: str) -> list[str]:
    """The checks the Hub's metadata validator would make that matter for bitsmith's cards."""
    if not content.startswith("---\n"):
        return []
    end = content.find("\n---\n", 4)
    if end < 0:
        return ["front matter is not closed by a '---' line"]
    try:
        meta = yaml.safe_load(content[4:end])
    except yaml.YAMLError as e:
        return [f"invalid YAML: {e}"]
    errors = []
    if not isinstance(meta, dict):
        return ["metadata must be a mapping"]
    for key in ("library_name", "license", "pipeline_tag", "base_model_relation"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
        errors.append('"tags" must be a list of strings')
    base = meta.get("base_model")
    if base is not None and not (isinstance(base, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", base)):
        errors.append('"base_model" must be a Hub model id')
    return errors


# --- a tiny compressed model folder -----------------------------------------------------------------------------------
def make_folder(path: Path, *, shards: int = 3, packed: bool = True, base_model: str = "tiny-org/tiny-llama",
                eval_results: bool = False, recipe: str | None = None, seed: int = 0) -> Path:
    """Write a tiny Llama-shaped folder as `bitsmith compress` leaves it: config with a bitsmith
    quantization_config, packed gwint (8-bit, group 32) q/k/v/o and MLP projections, safetensors (in `shards`
    files + index when shards > 1), a tokenizer config, recipe.yaml, bitsmith.json, optionally eval_results.json."""
    import torch
    from safetensors.torch import save_file

    from bitsmith.kernels import gwint

    g = torch.Generator().manual_seed(seed)
    hidden, inter, layers, vocab, bits, group = 32, 64, 2, 64, 8, 32
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).half(),
        "model.norm.weight": torch.ones(hidden).half(),
        "lm_head.weight": torch.randn(vocab, hidden, generator=g).half(),
    }
    modules = {}
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (16, hidden), "self_attn.v_proj": (16, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    linear_before = linear_after = 0
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(hidden).half()
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden).half()
        for name, (n, k) in shapes.items():
            linear_before += n * k * 2
            if packed:
                codes = torch.randint(0, 1 << bits, (n, k), generator=g)
                tensors[f"{p}.{name}.qweight"] = gwint.pack_codes(codes, bits)
                tensors[f"{p}.{name}.scales"] = (torch.rand(k // group, n, generator=g) / 100).half()
                linear_after += tensors[f"{p}.{name}.qweight"].numel() * 4 + tensors[f"{p}.{name}.scales"].numel() * 2
                modules[f"{p}.{name}"] = {"format": "gwint", "format_version": 1, "in_features": k, "out_features": n,
                                          "bits": bits, "group_size": group, "symmetric": True}
            else:
                tensors[f"{p}.{name}.weight"] = torch.randn(n, k, generator=g).half()
                linear_after += n * k * 2
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "vocab_size": vocab, "dtype": "float16",
              "tie_word_embeddings": False, "transformers_version": "5.23.0"}
    if packed:
        config["quantization_config"] = {"quant_method": "bitsmith", "version": 1, "modules": modules}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "tokenizer_class": "X"}) + "\n")

    names = sorted(tensors)
    if shards <= 1:
        save_file({n: tensors[n] for n in names}, str(path / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s::shards]
            save_file({n: tensors[n].contiguous() for n in part}, str(path / file))
            weight_map.update({n: file for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        )
    (path / "recipe.yaml").write_text(recipe if recipe is not None else
                                      "passes:\n  - type: finequant\n    bits: 8\n    group_size: 32\n"
                                      "    targets: [Linear]\n    ignore: [lm_head]\n")
    total_in = sum(t.numel() * 2 for n, t in tensors.items() if not n.endswith((".qweight", ".scales"))) + linear_before
    total_out = sum(t.numel() * t.element_size() for t in tensors.values())
    prov = {"bitsmith_version": "0.1.0", "base_model": base_model, "input_bytes": total_in, "output_bytes": total_out,
            "linear_bytes_before": linear_before, "linear_bytes_after": linear_after,
            "passes": [{"type": "finequant", "bits": bits, "group_size": group, "modules": len(modules),
                        "skipped": {"lm_head": "ignored by the recipe"}}]}
    (path / "bitsmith.json").write_text(json.dumps(prov, indent=2) + "\n")
    if eval_results:
        (path / "eval_results.json").write_text(json.dumps([
            {"metric": "perplexity", "text": "wiki.test.raw", "tokens": 4096, "window": 512, "ppl": 12.3456,
             "bits_per_char": 0.8123, "date": "2025-01-01"}], indent=2) + "\n")
    return path
