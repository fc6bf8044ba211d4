"""The HTTP server both RunPod emulators run on: a ThreadingHTTPServer on 127.0.0.1 handing each
request to its front end (`answer`), with the faults that are about the connection (a slow
RunPod, an answer lost before or after the operation was applied) done here once.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.standins.runpod_cloud import Fault, RunPodCloud


@dataclass
class Answer:
    """What a front end answers one request with; `body` None closes the connection unanswered."""

    status: int
    body: bytes | None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


DROP = Answer(0, None)


class EmulatorServer:
    """A ThreadingHTTPServer on 127.0.0.1 that hands each request to `answer`."""

    def __init__(self, cloud: RunPodCloud, host: str, port: int) -> None:
        self.cloud = cloud
        self._server = ThreadingHTTPServer((host, port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def origin(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def answer(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> Answer:
        raise NotImplementedError

    def start(self) -> EmulatorServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def with_fault(self, fault: Fault | None, apply: Any) -> Answer:
        """Answer with `apply()` under the cloud's lock, as the fault (if any) allows: a slow
        RunPod works before it applies; a dropped connection comes before or after applying."""
        if fault is not None and fault.kind == "drop_before_apply":
            return DROP
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.delay_s)
        with self.cloud.lock:
            answer = apply()
        if fault is not None and fault.kind == "drop_after_apply":
            return DROP
        return answer

    # The cloud's state and controls, reached through the server as tests expect.
    _SHARED = frozenset({"ready_after_polls", "pub_key", "api_key", "catalogue"})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "cloud":
            raise AttributeError(name)
        return getattr(self.cloud, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._SHARED:
            setattr(self.cloud, name, value)
        else:
            super().__setattr__(name, value)


def json_answer(status: int, payload: Any, **headers: str) -> Answer:
    return Answer(status, json.dumps(payload).encode(), headers=dict(headers))


def _make_handler(server: EmulatorServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes; without this, Nagle's algorithm and the client's
        # delayed ACK add 40 ms to every answer.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            pass  # quiet: tests and the person at the terminal do not want a line per request

        def _handle(self) -> None:
            path, _, query = self.path.partition("?")
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            answer = server.answer(self.command, path, query, headers, body)
            if answer.body is None:
                # The request was read (and maybe applied); the client never hears back.
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(answer.status)
            if answer.status != 204:
                self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(answer.body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle  # noqa: N815

    return Handler
