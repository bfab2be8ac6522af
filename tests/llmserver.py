"""A real loopback LLM server for tests: OpenAI chat-completions and Anthropic Messages.

Tests talk to it through the official SDKs over real HTTP, so what is exercised is the
wire format, the SDK and our retry/redaction code together, with nothing patched.

    from llmserver import Delay, Fail, LlmServer, Reply

    with LlmServer() as server:
        server.script("first reply", Fail(429, retry_after=1), Reply("{}", output_tokens=7))
        config = server.config("anthropic", api_key_env="TEST_KEY")   # an LlmConfig aimed here
        ...                                                           # make_provider(config, {"TEST_KEY": "k"})
        server.requests[0].body["system"]                             # what the SDK sent
        server.requests[0].headers["x-api-key"]

Script entries are consumed one per request, whichever endpoint it hits:

* ``str`` or ``Reply(text, input_tokens=, output_tokens=, finish_reason=)``: a successful
  reply (streamed as SSE when the request asks for ``stream``). Token counts default to
  ``len(prompt text) // 4 + 1`` and ``len(reply) // 4 + 1``.
* ``Fail(status, message=, retry_after=, mid_stream=)``: that HTTP status with the provider's
  JSON error body and, if given, a ``Retry-After`` header; with ``mid_stream=True`` a streamed
  request instead gets HTTP 200 and then an error event (as overloaded servers do).
* ``Delay(seconds, then=)``: wait before answering with ``then``, to make a client time out.

A request with nothing left in the script gets HTTP 400 "no scripted response left", and
leaving the block with unused entries fails the test (pass ``strict=False`` to allow it).
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ratiocinator.llm import LlmConfig


@dataclass(frozen=True)
class Reply:
    """A successful reply; token counts default to a length-based guess."""

    text: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None  # default: "stop" (OpenAI) / "end_turn" (Anthropic)


@dataclass(frozen=True)
class Fail:
    """An HTTP error with the provider's error body; `message` defaults to a generic one."""

    status: int
    message: str | None = None
    retry_after: float | str | None = None
    mid_stream: bool = False  # for a streamed request: HTTP 200, then an error event instead of the reply


@dataclass(frozen=True)
class Delay:
    """Answer only after `seconds` (the client has usually given up by then)."""

    seconds: float
    then: Reply | str = "too late"


Entry = Reply | Fail | Delay | str


@dataclass(frozen=True)
class Request:
    """One request as received: path, headers (lower-case names) and the JSON body."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def raw(self) -> str:
        """Headers and body as one text, for asserting something appears nowhere."""
        return json.dumps({"path": self.path, "headers": self.headers, "body": self.body})


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_PATHS = {"/v1/chat/completions": "openai", "/v1/messages": "anthropic"}


@dataclass
class LlmServer:
    """Scripted OpenAI + Anthropic server on 127.0.0.1 (a free port), as a context manager."""

    strict: bool = True
    requests: list[Request] = field(default_factory=list)
    _queue: list[Entry] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closing: threading.Event = field(default_factory=threading.Event)
    _httpd: ThreadingHTTPServer | None = None

    def __enter__(self) -> LlmServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="llmserver", daemon=True
        ).start()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._closing.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self.strict and exc_type is None and self._queue:
            raise AssertionError(f"llmserver: {len(self._queue)} scripted response(s) never requested: {self._queue}")

    @property
    def url(self) -> str:
        """Server root, e.g. http://127.0.0.1:54321 (Anthropic's base_url)."""
        assert self._httpd is not None, "use LlmServer as a context manager"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def base_url(self, provider: str) -> str:
        """The base_url each SDK expects: OpenAI-compatible ones include /v1."""
        return self.url + "/v1" if provider == "openai" else self.url

    def config(self, provider: str, **fields: Any) -> LlmConfig:
        """An LlmConfig aimed at this server, with fast retries; `fields` override anything."""
        values: dict[str, Any] = {
            "provider": provider,
            "model": "test-model",
            "base_url": self.base_url(provider),
            "backoff_s": 0.01,
            "timeout_s": 5,
        }
        values.update(fields)
        return LlmConfig(**values)

    def script(self, *entries: Entry) -> None:
        """Queue responses, one per coming request."""
        with self._lock:
            self._queue.extend(entries)

    @property
    def remaining(self) -> int:
        with self._lock:
            return len(self._queue)

    def _next(self, request: Request) -> Entry | None:
        with self._lock:
            self.requests.append(request)
            return self._queue.pop(0) if self._queue else None


class _Handler(BaseHTTPRequestHandler):
    owner: LlmServer
    server_version = "llmserver/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {"_unparsed": raw.decode("utf-8", "replace")}
        path = self.path.split("?", 1)[0]
        request = Request(path=path, headers={k.lower(): v for k, v in self.headers.items()}, body=body)
        kind = _PATHS.get(path)
        if kind is None:
            self.owner._next(request)  # recorded, not consuming the script
            self._json(404, _error_body("openai", 404, f"llmserver: no endpoint {path}"))
            return
        entry = self.owner._next(request)
        try:
            self._answer(kind, body, entry)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to do

    def _answer(self, kind: str, body: dict[str, Any], entry: Entry | None) -> None:
        if isinstance(entry, Delay):
            self.owner._closing.wait(entry.seconds)
            entry = entry.then
        if entry is None:
            self._json(400, _error_body(kind, 400, "llmserver: no scripted response left"))
            return
        if isinstance(entry, Fail) and entry.mid_stream and body.get("stream"):
            error = _error_body(kind, entry.status,
                                entry.message or f"llmserver: scripted error mid-stream ({entry.status})")
            self._sse([("error" if kind == "anthropic" else None, error)], openai=kind == "openai")
            return
        if isinstance(entry, Fail):
            headers = {"retry-after": str(entry.retry_after)} if entry.retry_after is not None else {}
            message = entry.message or f"llmserver: scripted HTTP {entry.status}"
            self._json(entry.status, _error_body(kind, entry.status, message), headers)
            return
        reply = Reply(entry) if isinstance(entry, str) else entry
        tokens_in = reply.input_tokens if reply.input_tokens is not None else len(_prompt_text(body)) // 4 + 1
        tokens_out = reply.output_tokens if reply.output_tokens is not None else len(reply.text) // 4 + 1
        model = str(body.get("model", "unknown"))
        if kind == "openai":
            finish = reply.finish_reason or "stop"
            if body.get("stream"):
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                self._sse(_openai_chunks(model, reply.text, finish, tokens_in, tokens_out, usage), openai=True)
            else:
                self._json(200, _openai_message(model, reply.text, finish, tokens_in, tokens_out))
        else:
            finish = reply.finish_reason or "end_turn"
            if body.get("stream"):
                self._sse(_anthropic_events(model, reply.text, finish, tokens_in, tokens_out), openai=False)
            else:
                self._json(200, _anthropic_message(model, reply.text, finish, tokens_in, tokens_out))

    def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: list[tuple[str | None, dict[str, Any] | str]], *, openai: bool) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.end_headers()  # HTTP/1.0: the body runs until the connection closes
        for event, data in events:
            text = data if isinstance(data, str) else json.dumps(data)
            frame = (f"event: {event}\n" if event else "") + f"data: {text}\n\n"
            self.wfile.write(frame.encode())
            self.wfile.flush()
        if openai:
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()


def _prompt_text(body: dict[str, Any]) -> str:
    parts = [str(body.get("system") or "")]
    for message in body.get("messages") or []:
        content = message.get("content")
        parts.append(content if isinstance(content, str) else json.dumps(content))
    return "".join(parts)


def _pieces(text: str) -> list[str]:
    """The reply split into word-sized deltas that concatenate back to it exactly."""
    return re.findall(r"\S+\s*|\s+", text)


def _error_body(kind: str, status: int, message: str) -> dict[str, Any]:
    kind_name = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    if kind == "anthropic":
        return {"type": "error", "error": {"type": kind_name, "message": message}}
    return {"error": {"message": message, "type": kind_name, "param": None, "code": None}}


def _openai_message(model: str, text: str, finish: str, tokens_in: int, tokens_out: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-llmserver",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out},
    }


def _openai_chunks(
    model: str, text: str, finish: str, tokens_in: int, tokens_out: int, usage: bool
) -> list[tuple[str | None, dict[str, Any] | str]]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-llmserver",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    events: list[tuple[str | None, dict[str, Any] | str]] = [(None, chunk({"role": "assistant", "content": ""}))]
    events += [(None, chunk({"content": piece})) for piece in _pieces(text)]
    events.append((None, chunk({}, finish)))
    if usage:
        events.append((None, {
            "id": "chatcmpl-llmserver",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                      "total_tokens": tokens_in + tokens_out},
        }))
    return events


def _anthropic_message(model: str, text: str, finish: str, tokens_in: int, tokens_out: int) -> dict[str, Any]:
    return {
        "id": "msg_llmserver",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": finish,
        "stop_sequence": None,
        "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
    }


def _anthropic_events(
    model: str, text: str, finish: str, tokens_in: int, tokens_out: int
) -> list[tuple[str | None, dict[str, Any] | str]]:
    start = _anthropic_message(model, "", finish, tokens_in, 1)
    start.update(content=[], stop_reason=None)
    events: list[tuple[str | None, dict[str, Any] | str]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start",
         {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
    ]
    events += [
        ("content_block_delta",
         {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})
        for piece in _pieces(text)
    ]
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": finish, "stop_sequence": None},
            "usage": {"output_tokens": tokens_out},
        }),
        ("message_stop", {"type": "message_stop"}),
    ]
    return events
