"""A local Hugging Face causal LM behind a minimal OpenAI-compatible HTTP API, on
loopback: what lets a benchmark or a test play "an API model" for real, reached through
the ``openai`` client or ``langchain-openai``'s ``ChatOpenAI``.

``POST /v1/chat/completions`` takes ``messages`` (formatted with the model's own chat
template; a base model without one gets ``template``, ``Question: ...\nAnswer:``), ``n``,
``temperature`` (0: greedy), ``max_tokens`` and ``seed``, and answers with ``n`` choices
sampled from one shared prefill (:func:`ssd_guard.generation.sample_answers`: the full
distribution, no top-k / top-p); like the teacher's answers, each ends at its first
line. ``GET /v1/models`` lists the one model. Requests are served one at a time (one
model, one lock). Standard library only::

    server = ChatServer(load_causal_lm("gemma3-270m"), "gemma-3-270m")
    url = server.start()          # http://127.0.0.1:<free port>/v1
    ...
    server.stop()
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from ssd_guard.answers import chat_prompt
from ssd_guard.generation import sample_answers, stop_token_table

__all__ = ["ChatServer"]


class ChatServer:
    """Serve *lm* (a :class:`~ssd_guard.models.LoadedModel`) as *model_name*."""

    def __init__(
        self,
        lm: Any,
        model_name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        template: str = "Question: {question}\nAnswer:",
    ):
        self.lm, self.model_name = lm, model_name
        #: How a user message is put to a model without a chat template (a base model).
        self.template = template
        self._lock = threading.Lock()
        self._stop_table: torch.Tensor | None = None
        self.requests = 0
        self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self) -> str:
        """Serve in a daemon thread; returns the base URL (``.../v1``)."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ChatServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the one endpoint ------------------------------------------------------------------
    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion request (the OpenAI schema's fields this server reads)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        system = next((m["content"] for m in messages if m.get("role") == "system"), None)
        user = [m["content"] for m in messages if m.get("role") == "user"]
        if not user:
            raise ValueError("no user message")
        n = int(body.get("n") or 1)
        temperature = float(body.get("temperature", 1.0))
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 32)
        if not 1 <= n <= 128 or not 1 <= max_tokens <= 1024 or temperature < 0:
            raise ValueError("n must be 1..128, max_tokens 1..1024, temperature >= 0")
        tok, model = self.lm.tokenizer, self.lm.model
        if getattr(tok, "chat_template", None) is not None:
            prompt = chat_prompt(tok, str(user[-1]), system)
        else:  # a base model: the plain question-answer format it is deployed with
            prompt = (f"{system}\n\n" if system else "") + self.template.format(question=user[-1])
        with self._lock:
            self.requests += 1
            if self._stop_table is None:
                self._stop_table = stop_token_table(tok, self.lm.device)
            gen = None
            if body.get("seed") is not None:
                gen = torch.Generator(device=self.lm.device).manual_seed(int(body["seed"]))
            res = sample_answers(
                model,
                tok,
                [prompt],
                n_samples=n if temperature > 0 else 0,
                temperature=max(temperature, 1e-6),
                default_temperature=0.0,
                max_new_tokens=max_tokens,
                generator=gen,
                return_hidden=False,
                stop_table=self._stop_table,
            )
        texts = res.samples[0] if temperature > 0 else res.default * n
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
                for i, t in enumerate(texts)
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }


def _handler(server: ChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                model = {"id": server.model_name, "object": "model", "owned_by": "local"}
                self._send(200, {"object": "list", "data": [model]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                self._send(200, server.complete(body))
            except (ValueError, KeyError, TypeError) as exc:
                self._send(400, {"error": {"message": str(exc), "type": "invalid_request_error"}})

    return Handler
