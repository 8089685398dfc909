"""Start and stop a real `vllm serve` (through memoir-serve) as a child process.

Used by the demo, the benchmarks and the tests. The server runs as its own process group on
a free localhost port, logs to a file, and is always killed on exit (SIGTERM to its group,
SIGKILL if it lingers). Imports no vLLM: the server process does.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

# Small KV cache (GiB, CPU engine only): it otherwise reserves a share of a NUMA node's memory.
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# The engine settings MEMOIR routing needs (vllm_memoir.validation refuses others).
REQUIRED_FLAGS = ["--no-enable-prefix-caching", "--no-enable-chunked-prefill"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memoir_overrides(artifact: str | Path, architecture: str = "MemoirLlamaForCausalLM") -> list[str]:
    import json

    return ["--hf-overrides", json.dumps({"architectures": [architecture], "memoir_path": str(artifact)})]


class VllmServer:
    def __init__(self, model_dir: str | Path, args: list[str], log_path: str | Path,
                 env: dict[str, str] | None = None, startup_timeout: float = 300.0):
        self.model_dir = str(model_dir)
        self.args = list(args)
        self.log_path = Path(log_path)
        self.env = {**os.environ, **DEFAULT_ENV, **(env or {})}
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm_memoir.serve", self.model_dir,
                "--host", "127.0.0.1", "--port", str(self.port), *self.args]

    def launch(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        logger.info("starting %s (log %s)", " ".join(self.command()), self.log_path)
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        cwd=self.log_path.parent, start_new_session=True)
        log.close()

    def start(self) -> "VllmServer":
        started = time.monotonic()
        self.launch()
        try:
            while time.monotonic() - started < self.startup_timeout:
                if self.process.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log_tail()}")
                if self._healthy():
                    self.startup_seconds = time.monotonic() - started
                    logger.info("server up on %s after %.0f s", self.url, self.startup_seconds)
                    return self
                time.sleep(1.0)
            raise TimeoutError(f"vllm serve not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def wait_for_exit(self, timeout: float) -> int:
        """Launch and wait for the server to exit by itself (start-up refusals); kills it on timeout."""
        self.launch()
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.stop()

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        pgid = os.getpgid(process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            process.wait(timeout=10)
        # Engine and worker processes share the group; make sure none outlives the test.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            return response.read().decode()

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=300, max_retries=0)

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_all(servers: list[VllmServer]) -> list[VllmServer]:
    """Start servers concurrently (start-up is mostly single-threaded imports); all or none."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(servers)) as pool:
        futures = [pool.submit(server.start) for server in servers]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        for server in servers:
            server.stop()
        raise errors[0]
    return servers


def metric_value(metrics_text: str, name: str) -> float:
    """Sum of a metric's samples in Prometheus text format (0 when absent)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total
