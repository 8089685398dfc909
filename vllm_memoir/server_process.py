"""Start and stop a real `vllm serve` (through memoir-serve) as a child process.

Used by the demo, the benchmarks and the tests. The server runs as its own process group on
a free localhost port, logs to a file, and is always killed on exit (SIGTERM to its group,
SIGKILL if it lingers). Imports no vLLM: the server process does.

A port found free is only free until someone binds it, and vLLM binds it after its imports,
seconds later; servers started side by side (and their engines' own ports) can take each
other's. So a launch that fails with "Address already in use" is retried on another port, and
the server counts as up only once its own process listens on the port: a health answer from
another process that holds the port is not taken for it.
"""

from __future__ import annotations

import errno
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
# How many ports one start tries before it gives up on "Address already in use".
PORT_ATTEMPTS = 5
ADDRESS_IN_USE = os.strerror(errno.EADDRINUSE)  # what the server logs when its port is taken
TCP_LISTEN = "0A"  # the LISTEN state in /proc/net/tcp


def free_port() -> int:
    """A localhost port free now; it may be taken before it is used (VllmServer retries)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_socket_inodes(port: int) -> set[str] | None:
    """Inodes of the TCP sockets listening on `port`, from /proc/net/tcp{,6}; None off Linux."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        return None
    inodes = set()
    for table in tables:
        try:
            rows = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # sl local_address rem_address st ... uid timeout inode
            if len(fields) > 9 and fields[3] == TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def session_listens_on(session_id: int, port: int) -> bool:
    """Whether a process of session `session_id` (a server started with start_new_session)
    holds a socket listening on `port`. True where /proc cannot tell (not Linux)."""
    inodes = listening_socket_inodes(port)
    if inodes is None:
        return True
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session_id:
                continue
            if any(os.readlink(fd) in wanted for fd in (entry / "fd").iterdir()):
                return True
        except OSError:  # the process exited meanwhile, or is not ours to read
            continue
    return False


class VllmServer:
    """`env` is laid over os.environ and DEFAULT_ENV; a value None removes the variable
    (e.g. {"VLLM_CPU_KVCACHE_SPACE": None} lets memoir-serve size the KV cache itself)."""

    def __init__(self, model_dir: str | Path, args: list[str], log_path: str | Path,
                 env: dict[str, str | None] | None = None, startup_timeout: float = 300.0):
        self.model_dir = str(model_dir)
        self.args = list(args)
        self.log_path = Path(log_path)
        merged = {**os.environ, **DEFAULT_ENV, **(env or {})}
        self.env = {name: value for name, value in merged.items() if value is not None}
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
        """Start the process (the log starts afresh); start() and wait_for_exit() call it."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        logger.info("starting %s (log %s)", " ".join(self.command()), self.log_path)
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        cwd=self.log_path.parent, start_new_session=True)
        log.close()

    def _relaunch_if_port_taken(self, attempt: int) -> bool:
        """After the process exited: when a port was taken under it, launch again on a new one."""
        if ADDRESS_IN_USE not in self.log_text() or attempt >= PORT_ATTEMPTS:
            return False
        self.stop()  # what is left of the failed launch's process group
        taken, self.port = self.port, free_port()
        logger.warning("vllm serve stopped at start-up with %r on port %d (log %s); retrying on port %d "
                       "(attempt %d of %d)", ADDRESS_IN_USE, taken, self.log_path, self.port, attempt + 1,
                       PORT_ATTEMPTS)
        self.launch()
        return True

    def start(self) -> "VllmServer":
        started = time.monotonic()
        self.launch()
        attempt = 1
        try:
            while time.monotonic() - started < self.startup_timeout:
                if self.process.poll() is not None:
                    if self._relaunch_if_port_taken(attempt):
                        attempt += 1
                        continue
                    raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log_tail()}")
                if session_listens_on(self.process.pid, self.port) and self._healthy():
                    self.startup_seconds = time.monotonic() - started
                    logger.info("server up on %s after %.0f s", self.url, self.startup_seconds)
                    return self
                time.sleep(1.0)
            raise TimeoutError(f"vllm serve not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def wait_for_exit(self, timeout: float) -> int:
        """Launch and wait for the server to exit by itself (start-up refusals); kills it on timeout.

        An exit because the port was taken is not the refusal asked about: that one runs again."""
        deadline = time.monotonic() + timeout
        self.launch()
        attempt = 1
        try:
            while True:
                code = self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                if code == 0 or not self._relaunch_if_port_taken(attempt):
                    return code
                attempt += 1
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
        if process is None:
            return
        pgid = process.pid  # start_new_session: the server leads its own group
        if process.poll() is None:
            os.killpg(pgid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                process.wait(timeout=10)
        # Engine and worker processes share the group, also when the server itself exited
        # first (a refused or failed start); make sure none outlives it.
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
