"""`llamaforge push` and `space --push`: the dry run, and real pushes through huggingface_hub to a stand-in Hub.

The stand-in is a small HTTP server on 127.0.0.1 implementing the endpoints `HfApi.create_repo` and
`HfApi.upload_folder` call: POST /api/repos/create, POST /api/{type}s/{id}/preupload/{rev} (answered "regular"
for every file, so content travels inline and no LFS/Xet storage is involved) and POST /api/{type}s/{id}/commit/{rev}
(the NDJSON commit). Any other request is recorded and fails the test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from click.testing import CliRunner

from llamaforge import build_model, load_model, load_spec, save_model
from llamaforge.cli import cli
from llamaforge.core.tokenizer import train_tokenizer

pytest.importorskip("huggingface_hub")
TOKEN = "hf_standin_token"


class StandInHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.unexpected: list[str] = []
        self.validated: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, code, payload, headers=None):
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                # repo_info, which create_repo(exist_ok=True) calls after a 401/403 to see if the repo exists
                m = re.fullmatch(r"/api/(models|spaces)/([^/]+/[^/?]+)", self.path)
                if not m:
                    hub.unexpected.append(f"GET {self.path}")
                    return self._reply(404, {"error": "not implemented by the stand-in"})
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._reply(401, {"error": "Invalid credentials"})
                if m.group(2) not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return self._reply(200, {"id": m.group(2), "sha": "0" * 40})

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._reply(401, {"error": "Invalid credentials"})
                base = f"http://{self.headers['Host']}"
                if self.path == "/api/validate-yaml":  # the client checks README.md metadata before uploading
                    req = json.loads(data)
                    errors = hub.card_errors(req["content"], req["repoType"])
                    hub.validated.append(req["repoType"])
                    return self._reply(400 if errors else 200, {"errors": errors, "warnings": []})
                if self.path == "/api/repos/create":
                    req = json.loads(data)
                    repo_id = f"{req['organization']}/{req['name']}"
                    url = f"{base}/{'spaces/' if req.get('type') == 'space' else ''}{repo_id}"
                    if repo_id in hub.repos:  # the Hub's answer names the existing repo
                        return self._reply(409, {"error": "You already created this repo", "url": url})
                    hub.repos[repo_id] = req
                    hub.files[repo_id] = {}
                    return self._reply(200, {"url": url})
                m = re.fullmatch(r"/api/(models|spaces)/([^/]+/[^/]+)/(preupload|commit)/([^/?]+)(\?.*)?", self.path)
                if not m or m.group(2) not in hub.repos:
                    hub.unexpected.append(f"POST {self.path}")
                    return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                repo_id, action = m.group(2), m.group(3)
                if action == "preupload":
                    files = json.loads(data)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._reply(200, {"files": modes})
                lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                for item in lines:
                    if item["key"] == "file":
                        v = item["value"]
                        assert v["encoding"] == "base64"
                        hub.files[repo_id][v["path"]] = base64.b64decode(v["content"])
                    elif item["key"] != "header":
                        hub.unexpected.append(f"commit operation {item['key']}")
                oid = hashlib.sha1(data).hexdigest()
                hub.commits.append({"repo": repo_id, "summary": header["summary"], "oid": oid})
                prefix = "spaces/" if m.group(1) == "spaces" else ""
                return self._reply(200, {"commitUrl": f"{base}/{prefix}{repo_id}/commit/{oid}", "commitOid": oid})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def card_errors(content: str, repo_type: str) -> list[dict]:
        """The checks the Hub applies that matter here: front matter parses as a mapping; Spaces name an sdk."""
        parts = content.split("---\n")
        if not content.startswith("---\n") or len(parts) < 3:
            return [{"message": "no YAML front matter"}]
        try:
            meta = yaml.safe_load(parts[1])
        except yaml.YAMLError as exc:
            return [{"message": f"invalid YAML: {exc}"}]
        if not isinstance(meta, dict):
            return [{"message": "metadata must be a mapping"}]
        if repo_type == "space" and meta.get("sdk") not in ("gradio", "docker", "static", "streamlit"):
            return [{"message": "Spaces need an sdk"}]
        if not isinstance(meta.get("tags", []), list):
            return [{"message": "tags must be a list"}]
        return []

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def run_dir(tmp_path):
    model = build_model(load_spec("tiny").with_updates(n_layers=1, vocab_size=300), seed=0)
    save_model(model, tmp_path / "run")
    train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 20, vocab_size=300).save(tmp_path / "run")
    return tmp_path / "run"


def test_dry_run_lists_files_and_card(run_dir):
    r = run("push", run_dir, "--repo", "me/tiny-llama", "--dry-run", "--private", "--license", "mit", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["dry_run"] and data["private"] and data["repo_id"] == "me/tiny-llama"
    names = {f["path"] for f in data["files"]}
    assert {"README.md", "config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert data["bytes"] == sum(f["bytes"] for f in data["files"]) > 0
    card = data["model_card"]
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["license"] == "mit"
    assert "llamaforge" in front["tags"] and front["pipeline_tag"] == "text-generation"
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-llama")' in card
    assert "n_layers: 1" in card  # the spec is in the card
    text = run("push", run_dir, "--repo", "me/tiny-llama", "--dry-run")
    assert "would create model repo me/tiny-llama" in text.output and "model.safetensors" in text.output


def test_push_to_stand_in_hub(run_dir, tmp_path):
    with StandInHub() as hub:
        args = ["push", run_dir, "--repo", "me/tiny-llama", "--endpoint", hub.url, "--token", TOKEN, "--json"]
        r = run(*args, "--private", "--message", "first upload")
        assert r.exit_code == 0, r.output
        data = json.loads(r.output)
        assert hub.unexpected == []
        assert hub.repos["me/tiny-llama"]["visibility"] == "private"
        assert data["url"] == f"{hub.url}/me/tiny-llama" and data["commit_url"].startswith(hub.url)
        uploaded = hub.files["me/tiny-llama"]
        assert set(uploaded) == {f["path"] for f in data["files"]}
        assert hub.commits[-1]["summary"] == "first upload"
        assert hub.validated == ["model"]
        # what arrived is a working model directory: same weights as the run it came from
        for name, content in uploaded.items():
            (tmp_path / "pulled").mkdir(exist_ok=True)
            (tmp_path / "pulled" / name).write_bytes(content)
        import torch

        ids = torch.randint(0, 300, (1, 7))
        with torch.no_grad():
            torch.testing.assert_close(load_model(tmp_path / "pulled")(ids).logits, load_model(run_dir)(ids).logits)
        # the repo already exists: a second push commits again instead of failing
        r = run(*args, "--format", "llamaforge")
        assert r.exit_code == 0, r.output
        assert len(hub.commits) == 2 and "spec.yaml" in hub.files["me/tiny-llama"]
        # a bad token is a one-line error naming the fix
        bad = run("push", run_dir, "--repo", "me/other", "--endpoint", hub.url, "--token", "wrong")
        assert bad.exit_code == 2 and "HF_TOKEN" in bad.output
    assert hub.unexpected == []


def test_space_push_to_stand_in_hub(run_dir, tmp_path):
    with StandInHub() as hub:
        r = run("space", run_dir, "--out", tmp_path / "space", "--push", "me/tiny-space", "--endpoint", hub.url,
                "--token", TOKEN, "--json")  # fmt: skip
        assert r.exit_code == 0, r.output
        assert hub.repos["me/tiny-space"]["type"] == "space" and hub.repos["me/tiny-space"]["sdk"] == "gradio"
        uploaded = hub.files["me/tiny-space"]
        assert {"app.py", "requirements.txt", "README.md", "model/model.safetensors", "llamaforge/__init__.py"} <= set(
            uploaded
        )
        assert not any("__pycache__" in p for p in uploaded)
        assert json.loads(r.output)["push"]["url"] == f"{hub.url}/spaces/me/tiny-space"
        assert hub.validated == ["space"]
    assert hub.unexpected == []


def test_bad_repo_ids(run_dir):
    r = run("push", run_dir, "--repo", "no-namespace", "--dry-run")
    assert r.exit_code == 2 and "USER/NAME" in r.output
