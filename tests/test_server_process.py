"""VllmServer's start-up with a stand-in server process (no vLLM): a taken port is retried, and
a health answer from the process that holds the port is not taken for the server's own."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vllm_memoir.server_process import ADDRESS_IN_USE, VllmServer

# Serves GET /health on the --port it is given (binding as vLLM does: fails if the port is taken).
STAND_IN = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

port = int(sys.argv[sys.argv.index("--port") + 1])
HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


class StandInServer(VllmServer):
    def command(self) -> list[str]:
        return [sys.executable, "-c", STAND_IN, "--port", str(self.port)]


class Healthy(BaseHTTPRequestHandler):
    """Another process's server on the port: answers /health too."""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def foreign_port():
    """A port held by a server of this (test) process, which answers /health with 200."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_taken_port_is_retried_and_a_foreign_health_answer_ignored(foreign_port, tmp_path):
    server = StandInServer("unused-model", [], tmp_path / "server.log", startup_timeout=60)
    server.port = foreign_port  # as if another process bound the port after free_port() chose it
    with server:
        assert server.port != foreign_port, "start-up took the foreign server's health answer for its own"
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert server._healthy()
        assert server.process.poll() is None  # the retried launch serves
    assert server.process is None


def test_refusal_run_is_retried_when_the_port_is_taken(foreign_port, tmp_path):
    """wait_for_exit (start-up refusals): an exit because the port was taken runs again."""
    refusing = StandInServer("unused-model", [], tmp_path / "refused.log")
    refusing.command = lambda: [sys.executable, "-c", STAND_IN.replace("serve_forever()", "server_close()")
                                + "\nsys.exit(3)", "--port", str(refusing.port)]
    refusing.port = foreign_port
    assert refusing.wait_for_exit(60) == 3  # the refusal itself, from a launch on a free port
    assert refusing.port != foreign_port and ADDRESS_IN_USE not in refusing.log_text()
