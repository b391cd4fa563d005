"""Child processes on loopback: free ports, start-and-wait-until-ready, stop with a grace period.

Owns the life cycle of the real servers `luigi-creds-broker dev`, `make demo` and the integration
tests start (the local OIDC issuer, OpenBao, moto, the broker itself). Talks to the operating
system (sockets, signals) and to the children over loopback HTTP while waiting for them to come
up. Each child writes stdout and stderr to one log file, so a failure can show what it said.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# A child that ignores SIGTERM gets this long before SIGKILL; our servers exit in well under 1 s.
STOP_GRACE_SECONDS = 5.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    # NOTE: the port can be taken between this call and the child's bind; callers that can ask
    # the child for port 0 and read the real port back should prefer that.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_ok(url: str, *, timeout: float = 1.0) -> bool:
    """True when a GET on `url` answers with any status below 500."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("only http(s) URLs are probed")
    try:
        # The scheme is checked above; children are only ever probed on loopback.
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            return int(response.status) < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Block until `url` answers (status < 500), or raise TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(url):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class ManagedProcess:
    """A child process started by a test, with its log file; stop() or kill() it when done."""

    def __init__(self, popen: subprocess.Popen[bytes], argv: Sequence[str], log_path: Path) -> None:
        self.popen = popen
        self.argv = tuple(argv)
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        """Everything the child has written to stdout and stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; return the exit status."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def kill(self) -> int:
        """SIGKILL the child (no chance to clean up) and reap it; return the exit status."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        return self.popen.wait()

    def __repr__(self) -> str:
        return f"ManagedProcess(pid={self.pid}, argv={self.argv[:2]!r}, log={self.log_path})"


def start_process(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    ready: Callable[[], bool] | None = None,
    ready_url: str | None = None,
    timeout: float = 30.0,
    cwd: Path | None = None,
) -> ManagedProcess:
    """Start `argv`, logging to `log_path`, and wait until `ready()` is true or `ready_url` answers.

    `env` is added on top of the current environment. If the child exits or is not ready within
    `timeout` seconds it is killed and RuntimeError carries the tail of its log.
    """
    if (ready is None) == (ready_url is None):
        raise ValueError("pass exactly one of ready= or ready_url=")
    check: Callable[[], bool]
    if ready_url is not None:
        url = ready_url

        def check() -> bool:
            return http_ok(url)

    else:
        assert ready is not None
        check = ready
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    process = ManagedProcess(popen, argv, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if popen.poll() is not None:
            raise RuntimeError(
                f"{argv[0]} exited with {popen.returncode} before it was ready:\n"
                + process.log_text()[-4000:]
            )
        if check():
            return process
        if time.monotonic() >= deadline:
            process.kill()
            raise RuntimeError(
                f"{argv[0]} not ready within {timeout} s:\n" + process.log_text()[-4000:]
            )
        time.sleep(0.05)
