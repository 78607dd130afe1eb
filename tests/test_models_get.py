"""`vd models --get` against a local stand-in for the Hugging Face Hub and for plain URLs.

A thread speaks the part of the Hub API that huggingface_hub's client uses: `GET /api/models/{repo_id}/revision/
{revision}?blobs=true` (the commit and every file's size, git blob id and LFS sha256) and `HEAD/GET /{repo_id}/
resolve/{revision}/{filename}` with the headers hf_hub_download reads (X-Repo-Commit, ETag / X-Linked-Etag /
X-Linked-Size, Content-Length, Range); and `/mirror/{host}/{path}` for files that are not on the Hub
($VD_DOWNLOAD_MIRROR). `vd` runs as a subprocess with HF_ENDPOINT pointing there: no test touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from stages.models import catalog, fetch, transfer
from stages.models.catalog import TARGETS, HubFile, UrlFile

ROOT = Path(__file__).resolve().parents[1]
COMMIT = hashlib.sha1(b"vd-test-commit").hexdigest()
LFS = (".safetensors", ".bin", ".pt", ".pth")


class FakeHub:
    """What the server serves and what it saw."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {}  # (repo_id, filename) -> content
        self.urls: dict[str, bytes] = {}  # "/host/path" -> content
        self.truncate: dict[str, int] = {}  # file ("repo_id/filename" or "/host/path") -> bytes its next GET sends
        self.corrupt: set[str] = set()  # files whose GET body differs from the advertised ETag
        self.log: list[tuple[str, str, str | None]] = []  # (method, file, Range header)

    def gets(self) -> list[tuple[str, str | None]]:
        """File downloads (not API calls): (file key, Range header)."""
        return [(key, rng) for method, key, rng in self.log if method == "GET" and not key.startswith("api/")]

    def repo_info(self, repo: str) -> dict | None:
        """What the Hub's model_info endpoint answers with blobs=true (None: no such repo)."""
        siblings = []
        for (rid, filename), content in sorted(self.files.items()):
            if rid != repo:
                continue
            item = {"rfilename": filename, "size": len(content), "blobId": git_sha1(content)}
            if filename.endswith(LFS):
                sha = hashlib.sha256(content).hexdigest()
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(content)}\n"
                item["lfs"] = {"size": len(content), "sha256": sha, "pointerSize": len(pointer)}
                item["blobId"] = git_sha1(pointer.encode())
            siblings.append(item)
        return {"id": repo, "sha": COMMIT, "siblings": siblings} if siblings else None


def git_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _lookup(self, path: str) -> tuple[str, bytes | None, dict[str, str]]:
        """(file key, content, Hub headers) for a request path."""
        parts = unquote(path).lstrip("/").split("/")
        if parts[0] == "mirror":
            key = "/" + "/".join(parts[1:])
            return key, self.hub.urls.get(key), {}
        if len(parts) < 5 or parts[2] != "resolve" or parts[3] not in ("main", COMMIT):
            return path, None, {}
        repo, filename = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
        key, content = f"{repo}/{filename}", self.hub.files.get((repo, filename))
        headers = {"X-Repo-Commit": COMMIT}
        if content is None:
            return key, None, {**headers, "X-Error-Code": "EntryNotFound"}
        if filename.endswith(LFS):  # LFS: the ETag is the sha256 of the content
            etag = hashlib.sha256(content).hexdigest()
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(content))})
        else:  # git: the blob sha1
            etag = git_sha1(content)
        headers["ETag"] = f'"{etag}"'
        return key, content, headers

    def _api(self, parts: list[str]) -> None:
        """GET /api/models/{org}/{name}/revision/{revision}; any other /api/ path is not found."""
        found = parts[1] == "models" and len(parts) == 6 and parts[4] == "revision" and parts[5] in ("main", COMMIT)
        key = f"api/{parts[2]}/{parts[3]}" if found else "api/" + "/".join(parts[1:])
        self.hub.log.append((self.command, key, urlsplit(self.path).query))
        info = self.hub.repo_info(key.removeprefix("api/")) if found else None
        body = json.dumps(info or {"error": "Repository not found"}).encode()
        self.send_response(200 if info else 404)
        if info is None:
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _serve(self, body: bool) -> None:
        parts = unquote(urlsplit(self.path).path).lstrip("/").split("/")
        if parts[0] == "api":  # model_info, or the client's own best-effort calls (answered 404)
            return self._api(parts)
        rng = self.headers.get("Range")
        key, content, headers = self._lookup(urlsplit(self.path).path)
        self.hub.log.append((self.command, key, rng))
        if content is None:
            self.send_response(404)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if body and key in self.hub.corrupt:
            content = bytes([content[0] ^ 0xFF]) + content[1:]
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        self.send_response(206 if start else 200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        self.send_header("Content-Length", str(len(content) - start))
        self.end_headers()
        if not body:
            return
        if key in self.hub.truncate:  # send part of it, then drop the connection
            self.wfile.write(content[start:start + self.hub.truncate.pop(key)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(content[start:])


@pytest.fixture(scope="module")
def server():
    hub = FakeHub()
    handler = type("BoundHandler", (Handler,), {"hub": hub})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield hub, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def standin(name: str, size: int = 3000) -> bytes:
    """Deterministic bytes for a file name."""
    blocks = (hashlib.sha256(name.encode() + (32 * i).to_bytes(4, "little")).digest() for i in range(-(-size // 32)))
    return b"".join(blocks)[:size]


def tiny_repo_files(tmp: Path) -> tuple[dict[tuple[str, str], bytes], dict[str, object]]:
    """The tiny model's real files under the SD1.5 / motion-adapter repo names (so they can be loaded), and
    the components they were saved from."""
    from stages.models.random_specs import build_random

    unet2d, adapter, vae, text, _ = build_random("tiny", 0)
    for sub, model in (("unet", unet2d), ("vae", vae), ("text_encoder", text)):
        model.save_pretrained(tmp / "sd15" / sub)
    adapter.save_pretrained(tmp / "adapter")
    files = {}
    for base, repo in ((tmp / "sd15", catalog.SD15_REPO), (tmp / "adapter", catalog.ADAPTER_REPO)):
        for path in base.rglob("*"):
            if path.is_file():
                files[(repo, path.relative_to(base).as_posix())] = path.read_bytes()
    return files, {"vae": vae, "text_encoder": text}


def fill(hub: FakeHub, names: list[str], real: dict[tuple[str, str], bytes] | None = None) -> None:
    """Serve every required file of `names` (optional ones stay absent: the repo lacks them)."""
    for name in names:
        for f in TARGETS[name]:
            if isinstance(f, HubFile):
                if not f.optional:
                    key = (f.repo_id, f.filename)
                    hub.files[key] = (real or {}).get(key) or standin(f.label)
            else:
                parts = urlsplit(f.url)
                hub.urls[f"/{parts.netloc}{parts.path}"] = standin(f.url, 5000)


def env_for(tmp: Path, url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=url, HF_HOME=str(tmp / "hf"), HF_HUB_CACHE=str(tmp / "hf" / "hub"), HF_HUB_OFFLINE="0",
               TRANSFORMERS_OFFLINE="0", HF_HUB_DISABLE_XET="1", VD_DOWNLOAD_MIRROR=f"{url}/mirror",
               XDG_CACHE_HOME=str(tmp / "cache"), PYTHONPATH=str(ROOT), NO_PROXY="*")
    for var in ("VD_SD15", "VD_MOTION_ADAPTER", "VD_SAM2_DIR", "VD_CLIP", "VD_PICKSCORE", "VD_LPIPS",
                "VD_PICKSCORE_PROCESSOR", "VD_DEBUG"):
        env.pop(var, None)
    env.update(extra)
    return env


def vd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdcli.app", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def models_json(tmp: Path, monkeypatch) -> dict:
    """`vd models --json` in this process (torch is already imported here), reading tmp's caches."""
    from huggingface_hub import constants
    from typer.testing import CliRunner

    from vdcli.app import app

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp / "hf" / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
    for var in ("VD_SD15", "VD_MOTION_ADAPTER", "VD_SAM2_DIR", "VD_CLIP", "VD_PICKSCORE", "VD_LPIPS",
                "VD_PICKSCORE_PROCESSOR"):
        monkeypatch.delenv(var, raising=False)
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error line: exactly one, last on stderr (progress lines may precede it without -q), no traceback."""
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("vd: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_get_resumes_verifies_and_models_finds_them(server, tmp_path, monkeypatch):
    hub, url = server
    names = ["sd15", "motion-adapter", "sam2-tiny", "clip", "pickscore"]
    real, parts = tiny_repo_files(tmp_path / "src")
    fill(hub, names, real)
    # the first GET of the SAM2 weights drops after 11 MiB: more than huggingface_hub's 10 MiB write chunk, so
    # some of it reached the disk and the retry continues from there
    sam2 = TARGETS["sam2-tiny"][0]
    hub.files[(sam2.repo_id, sam2.filename)] = standin(sam2.label, 12 << 20)
    hub.truncate[sam2.label] = cut = 11 << 20
    env = env_for(tmp_path, url)

    proc = vd(env, "models", "--get", *names, "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # -q: nothing on stderr
    out = json.loads(proc.stdout)
    by_file = {item["file"]: item for item in out["files"]}
    expected = [f for n in names for f in TARGETS[n]]
    assert len(out["files"]) == len(expected)
    for f in expected:
        item = by_file[f.label]
        if f.optional:
            assert item["status"] == "skipped", item
            continue
        assert item["status"] == "downloaded", item
        assert Path(item["path"]).read_bytes() == hub.files[(f.repo_id, f.filename)]
        assert Path(item["path"]).is_relative_to(tmp_path / "hf" / "hub")
        assert item["verified"] == ("sha256" if f.filename.endswith(LFS) else "git-sha1")
    # the dropped transfer continued where it stopped
    sam2_gets = [rng for path, rng in hub.gets() if path == sam2.label]
    assert len(sam2_gets) == 2 and sam2_gets[0] is None and sam2_gets[1].startswith("bytes="), sam2_gets
    assert 0 < int(sam2_gets[1].removeprefix("bytes=").rstrip("-")) <= cut
    assert not list((tmp_path / "hf" / "hub").rglob("*.incomplete"))
    # only the listed files were requested (not whole repos); optional ones the repo lacks not even asked for
    requested = {key for _, key, _ in hub.log if not key.startswith("api/")}
    assert requested == {f.label for n in names for f in TARGETS[n] if not f.optional}
    # one metadata call per repository, with the files' hashes asked for
    repos = {f.repo_id for n in names for f in TARGETS[n] if isinstance(f, HubFile)}
    api = [(key, str(query).lower()) for _, key, query in hub.log if key.startswith("api/") and key.count("/") == 2]
    assert sorted(api) == sorted((f"api/{repo}", "blobs=true") for repo in repos)

    # `vd models` now finds them
    status = models_json(tmp_path, monkeypatch)
    comps = {c["name"]: c for c in status["components"]}
    for name in ("sd15", "motion_adapter", "sam2-tiny", "clip", "pickscore"):
        assert comps[name]["present"], comps[name]
    assert not comps["lpips"]["present"] and comps["lpips"]["get"].startswith("vd models --get lpips")
    assert not comps["sam2-large"]["present"] and "vd models --get sam2-large" in comps["sam2-large"]["get"]
    assert status["specs"]["sd15-animatediff-v3"]

    # a second run downloads nothing
    hub.log.clear()
    again = json.loads(vd(env, "models", "--get", *names, "--json").stdout)
    assert again["downloaded"] == 0 and again["failed"] == 0 and again["bytes"] == 0
    assert {i["status"] for i in again["files"]} == {"cached", "skipped"}
    assert hub.gets() == []
    # a cached file of the wrong size is fetched again; offline, a complete cache is all it takes
    config = Path(by_file[f"{catalog.CLIP_REPO}/config.json"]["path"])
    config.resolve().write_bytes(b"{}")
    hub.log.clear()
    fixed = json.loads(vd(env, "models", "--get", "clip", "--json", "-q").stdout)
    assert fixed["downloaded"] == 1 and hub.gets() == [(f"{catalog.CLIP_REPO}/config.json", None)]
    assert config.read_bytes() == hub.files[(catalog.CLIP_REPO, "config.json")]
    hub.log.clear()
    offline = vd({**env, "HF_HUB_OFFLINE": "1"}, "models", "--get", *names, "--json", "-q")
    assert offline.returncode == 0 and offline.stderr == "", offline.stderr
    assert json.loads(offline.stdout)["cached"] == again["cached"] and hub.log == []

    # the existing loaders accept the partial snapshots (snapshot_download(local_files_only=True) included)
    from stages.models.load import load_models

    assert catalog.hub_snapshot(catalog.SD15_REPO) is not None
    models = load_models(catalog.DEFAULT_SPEC, device="cpu")
    for component, saved in parts.items():
        loaded = getattr(models, component).state_dict()
        for name, value in saved.state_dict().items():
            assert bool((loaded[name] == value).all()), name
    assert models.sources["sd15"] == f"hub:{catalog.SD15_REPO}"
    assert catalog.locate("clip") is not None and (catalog.locate("clip") / "model.safetensors").is_file()
    assert (catalog.locate("pickscore-processor") / "preprocessor_config.json").is_file()


def test_resume_across_runs_and_corrupt_files_are_refused(server, tmp_path, monkeypatch):
    hub, url = server
    fill(hub, ["lpips", "sam2-small"])
    env = env_for(tmp_path, url)
    alex = next(f for f in TARGETS["lpips"] if f.filename == "alex.pth")
    content = hub.urls[f"/{urlsplit(alex.url).netloc}{urlsplit(alex.url).path}"]
    folder = tmp_path / "cache" / "vd" / "lpips"
    folder.mkdir(parents=True)
    (folder / "alex.pth.part").write_bytes(content[:1234])  # left by an interrupted run
    sam2 = TARGETS["sam2-small"][0]
    hub.corrupt.add(sam2.label)

    proc = vd(env, "models", "--get", "lpips", "sam2-small")
    assert proc.returncode == 4
    line = one_line_error(proc)
    # the stand-in AlexNet cannot match torchvision's published sha256 prefix; the SAM2 body was altered
    assert "lpips/alexnet-owt-7be5be79.pth" in line and f"{sam2.repo_id}/{sam2.filename}" in line
    assert "lpips/alex.pth" not in line and "sha256" in line
    # the partial file was continued, not restarted
    alex_gets = [rng for key, rng in hub.gets() if key.endswith("/alex.pth")]
    assert alex_gets == ["bytes=1234-"]
    assert (folder / "alex.pth").read_bytes() == content
    # refused files are not left anywhere (no final file, no partial file to resume from)
    assert sorted(p.name for p in folder.iterdir()) == ["alex.pth"]
    storage = tmp_path / "hf" / "hub" / f"models--{sam2.repo_id.replace('/', '--')}"
    assert not [p for p in storage.rglob("*") if (p.is_file() or p.is_symlink()) and "refs" not in p.parts]
    comps = {c["name"]: c for c in models_json(tmp_path, monkeypatch)["components"]}
    assert not comps["sam2-small"]["present"] and not comps["lpips"]["present"]


def test_offline_and_unreachable_fail_with_one_line(server, tmp_path):
    hub, url = server
    hub.log.clear()
    proc = vd(env_for(tmp_path, url, HF_HUB_OFFLINE="1"), "models", "--get", "sd15", "lpips", "-q")
    assert proc.returncode == 4
    line = one_line_error(proc)
    assert proc.stderr.strip() == line and proc.stdout == ""
    assert "HF_HUB_OFFLINE" in line and "could not get 13 file(s)" in line
    assert f"{catalog.SD15_REPO}/unet/diffusion_pytorch_model.safetensors" in line
    assert "lpips/alexnet-owt-7be5be79.pth" in line and "lpips/alex.pth" in line
    assert hub.log == []

    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = vd(env_for(tmp_path, dead), "models", "--get", "motion-adapter", "--json")
    assert proc.returncode == 4
    line = one_line_error(proc)
    assert "cannot reach" in line and f"{catalog.ADAPTER_REPO}/config.json" in line
    assert json.loads(proc.stdout)["failed"] == 2  # per-file results still on stdout with --json

    proc = vd(env_for(tmp_path, url), "models", "--get", "sam2-base_plus")  # a repo the stand-in Hub lacks
    assert proc.returncode == 4 and "repository not found" in one_line_error(proc)
    proc = vd(env_for(tmp_path, url), "models", "--get", "sd16")
    assert proc.returncode == 2 and "unknown weights 'sd16'" in one_line_error(proc)
    proc = vd(env_for(tmp_path, url), "models", "sd15")
    assert proc.returncode == 2 and "--get" in one_line_error(proc)


def test_names_and_verify(tmp_path):
    assert fetch.parse_names(["all"]) == list(catalog.ALL)
    assert fetch.parse_names(["sam2,clip", "sam2-large", "adapter"]) == ["sam2-large", "clip", "motion-adapter"]
    assert all(isinstance(f, UrlFile) for f in TARGETS["lpips"])
    path = tmp_path / "f"
    path.write_bytes(b"hello\n")
    git = "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object` of "hello\n"
    sha = hashlib.sha256(b"hello\n").hexdigest()
    assert transfer.verify(path, 6, git_sha1=git)[1] == "git-sha1"
    assert transfer.verify(path, 6, sha256=sha) == (sha, "sha256")
    assert transfer.verify(path, None, sha256=sha[:8])[1] == "sha256-prefix"
    assert transfer.verify(path, 6)[1] == "size"
    for kwargs in ({"git_sha1": git[::-1]}, {"sha256": sha[::-1]}, {"sha256": "00000000"}):
        with pytest.raises(transfer.TransferError):
            transfer.verify(path, 6, **kwargs)
    with pytest.raises(transfer.TransferError, match="size"):
        transfer.verify(path, 7)
