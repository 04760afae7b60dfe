"""A Hugging Face Hub on 127.0.0.1 serving model repos from memory: the endpoints ``huggingface_hub``'s
``snapshot_download`` and ``list_repo_files`` call (repo info, the file tree, ``resolve`` with ranges),
with the Hub's error codes (``X-Error-Code``: RepoNotFound, GatedRepo, RevisionNotFound). A process
pointed at it with ``HF_ENDPOINT`` downloads as from the Hub, without a network; ``log`` records every
request as (method, path)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse


class FakeHub:
    """``repos``: {repo_id: {"files": {name: bytes}, "refs": {revision: commit}, "gated": bool, "down": bool}};
    every ref of a repo serves the same files. A gated repo answers only requests that carry a token; a
    repo that is down answers every request with a 500."""

    def __init__(self, repos: dict):
        self.repos = repos
        self.log: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(head=True)

            def do_GET(self):
                self.answer(head=False)

            def send(self, code, body=b"", headers=(), head=False):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def error(self, code, error_code, head):
                self.send(code, json.dumps({"error": error_code}).encode(),
                          [("X-Error-Code", error_code), ("Content-Type", "application/json")], head)

            def answer(self, head):
                url = urllib.parse.urlparse(self.path)
                hub.log.append((self.command, urllib.parse.unquote(url.path)))
                parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
                api = parts[:2] == ["api", "models"]
                repo_id, rest = ("/".join(parts[2:4]), parts[4:]) if api else ("/".join(parts[:2]), parts[2:])
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self.error(401, "RepoNotFound", head)  # what the Hub answers without a token
                if repo.get("down"):
                    return self.error(500, "InternalError", head)
                if repo.get("gated") and not self.headers.get("Authorization"):
                    return self.error(403, "GatedRepo", head)
                revision = rest[1] if len(rest) > 1 else "main"
                commits = set(repo["refs"].values())
                commit = revision if revision in commits else repo["refs"].get(revision)
                if commit is None:
                    return self.error(404, "RevisionNotFound", head)
                files = repo["files"]
                json_type = [("Content-Type", "application/json")]
                if api and rest[:1] == ["revision"]:
                    info = {"id": repo_id, "sha": commit, "private": False,
                            "siblings": [{"rfilename": n} for n in files]}
                    return self.send(200, json.dumps(info).encode(), json_type, head)
                if api and rest[:1] == ["tree"]:
                    tree = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                            for n, d in files.items()]
                    return self.send(200, json.dumps(tree).encode(), json_type, head)
                name = "/".join(rest[2:])
                if rest[:1] != ["resolve"] or name not in files:
                    return self.error(404, "EntryNotFound", head)
                data = files[name]
                headers = [("X-Repo-Commit", commit), ("ETag", f'"{hashlib.sha1(data).hexdigest()}"')]
                start = 0
                if self.headers.get("Range") and not head:  # a resumed download
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    headers.append(("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"))
                return self.send(206 if start else 200, data[start:], headers, head)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fetched(self) -> set[str]:
        """The file names of every GET of ``resolve`` so far."""
        return {p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p in self.log if m == "GET" and "/resolve/" in p}

    def close(self):
        self.server.shutdown()
        self.server.server_close()
