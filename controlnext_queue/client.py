"""ComfyUI's HTTP API, as the queue command uses it (standard library only)."""
from __future__ import annotations

import json
import mimetypes
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid

from .errors import Exit, QueueError


class ComfyClient:
    def __init__(self, server: str, timeout: float = 60.0):
        self.server = server.rstrip("/")
        if not self.server.startswith(("http://", "https://")):
            raise QueueError(Exit.USAGE, f"--server must be an http:// URL, not {server!r}")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    @property
    def websocket_url(self) -> str:
        scheme, rest = self.server.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={self.client_id}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                lost: Exit = Exit.UNREACHABLE) -> tuple[int, bytes]:
        """(status, body) for any HTTP answer; QueueError(``lost``) when there is no answer."""
        request = urllib.request.Request(self.server + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            if lost == Exit.UNREACHABLE:
                raise QueueError(lost, f"cannot reach ComfyUI at {self.server} ({reason}). Is the server running, "
                                       f"and is --server its address?") from None
            raise QueueError(lost, f"lost the connection to {self.server} ({reason}) while the prompt was running. "
                                   f"The server may have stopped or restarted: check its log.") from None

    def get_json(self, path: str, lost: Exit = Exit.UNREACHABLE):
        status, body = self.request("GET", path, lost=lost)
        if status != 200:
            raise QueueError(lost, f"GET {path} answered {status}: {body[:300].decode(errors='replace')}")
        return json.loads(body)

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def submit(self, prompt: dict) -> tuple[int, dict]:
        body = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        status, answer = self.request("POST", "/prompt", body, {"Content-Type": "application/json"})
        try:
            return status, json.loads(answer) if answer else {}
        except json.JSONDecodeError:
            return status, {"error": {"message": answer[:300].decode(errors="replace")}}

    def history(self, prompt_id: str, lost: Exit = Exit.CONNECTION_LOST) -> dict | None:
        return self.get_json(f"/history/{urllib.parse.quote(prompt_id)}", lost=lost).get(prompt_id)

    def has_queued(self, prompt_id: str) -> bool:
        """Whether the prompt is running or waiting in the server's queue."""
        state = self.get_json("/queue", lost=Exit.CONNECTION_LOST)
        return any(len(item) > 1 and item[1] == prompt_id
                   for item in state.get("queue_running", []) + state.get("queue_pending", []))

    def cancel(self, prompt_id: str) -> None:
        """Takes the prompt out of the queue if it waits there, and interrupts it if it runs (the
        server ignores a prompt_id that is not running: another client's prompt goes on)."""
        headers = {"Content-Type": "application/json"}
        self.request("POST", "/queue", json.dumps({"delete": [prompt_id]}).encode(), headers)
        self.request("POST", "/interrupt", json.dumps({"prompt_id": prompt_id}).encode(), headers)

    def upload_image(self, path: str, name: str | None = None) -> str:
        """Uploads into the server's input folder, as ``name`` (default: the file's own name);
        returns the name a LoadImage node takes."""
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as error:
            raise QueueError(Exit.USAGE, f"cannot read the image {path}: {error.strerror}") from None
        boundary = uuid.uuid4().hex
        filename = name or os.path.basename(path)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        fields = [(b'name="image"; filename="' + filename.encode() + b'"', content_type.encode(), data),
                  (b'name="overwrite"', b"text/plain", b"true"),
                  (b'name="type"', b"text/plain", b"input")]
        body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Disposition: form-data; " + disposition +
                        b"\r\nContent-Type: " + kind + b"\r\n\r\n" + value + b"\r\n" for disposition, kind, value in fields)
        body += b"--" + boundary.encode() + b"--\r\n"
        status, answer = self.request("POST", "/upload/image", body,
                                      {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            raise QueueError(Exit.INVALID_PROMPT, f"the server refused the upload of {path} ({status}): "
                                                  f"{answer[:300].decode(errors='replace')}")
        uploaded = json.loads(answer)
        return f"{uploaded['subfolder']}/{uploaded['name']}" if uploaded.get("subfolder") else uploaded["name"]

    def download(self, file: dict, directory: str) -> str:
        """Saves one output file ({filename, subfolder, type}) under ``directory``; returns its path."""
        query = urllib.parse.urlencode({"filename": file["filename"], "subfolder": file.get("subfolder", ""),
                                        "type": file.get("type", "output")})
        status, data = self.request("GET", f"/view?{query}", lost=Exit.CONNECTION_LOST)
        if status != 200:
            raise QueueError(Exit.CONNECTION_LOST, f"could not download {file['filename']} ({status})")
        root = os.path.abspath(directory)
        target = os.path.abspath(os.path.join(root, file.get("subfolder", ""), file["filename"]))
        if os.path.commonpath((root, target)) != root:  # never write outside --out, whatever the server says
            target = os.path.join(root, os.path.basename(file["filename"]))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as out:
            out.write(data)
        return target
