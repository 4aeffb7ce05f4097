"""A local Hugging Face Hub on 127.0.0.1: the endpoints ``huggingface_hub`` calls, serving ``Hub.repos``
(the hub and doc-command tests point ``HF_ENDPOINT`` at it)."""
import hashlib
import json
import re
from http.server import BaseHTTPRequestHandler

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub(BaseHTTPRequestHandler):
    """The Hub endpoints ``hf_hub_download`` / ``snapshot_download`` call:
    ``/api/models/{repo}/revision/{rev}`` (repo info: commit sha, files), ``HEAD`` + ``GET
    /{repo}/resolve/{rev}/{file}`` (``X-Repo-Commit``, ``ETag``, ``Content-Length``; 404 with
    ``X-Error-Code: RepoNotFound`` / ``EntryNotFound``)."""
    repos: dict = {}  # repo id -> {filename: bytes}
    log: list = []

    def log_message(self, *args):
        pass

    def _missing(self, code):
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, body: bool):
        self.log.append((self.command, self.path))
        path = self.path.split("?")[0]
        info = re.fullmatch(r"/api/models/(.+)/revision/([^/]+)", path)
        resolve = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        repo = (info or resolve).group(1) if (info or resolve) else None
        if repo not in self.repos:
            return self._missing("RepoNotFound")
        files = self.repos[repo]
        if info:
            data = json.dumps(dict(id=repo, modelId=repo, sha=COMMIT, private=False,
                                   siblings=[dict(rfilename=f) for f in files])).encode()
            etag, commit = hashlib.sha1(data).hexdigest(), COMMIT
        else:
            if resolve.group(3) not in files:
                return self._missing("EntryNotFound")
            data = files[resolve.group(3)]
            etag, commit = hashlib.sha256(data).hexdigest(), COMMIT
        self.send_response(200)
        self.send_header("Content-Type", "application/json" if info else "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self):
        self._serve(True)

    def do_HEAD(self):
        self._serve(False)
