"""Process helpers for integration tests: the local OIDC issuer as a child process.

The generic pieces (free loopback ports, starting a child and waiting until it is ready, stopping
it) live in `broker.dev.processes`, shared with `luigi-creds-broker dev`, and are re-exported here
so tests keep importing them from `servers`. Talks to the dev issuer over loopback HTTP.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from broker.dev.processes import (
    STOP_GRACE_SECONDS,
    ManagedProcess,
    free_port,
    http_ok,
    start_process,
    wait_http,
)

__all__ = [
    "REPO_ROOT",
    "STOP_GRACE_SECONDS",
    "DevIssuer",
    "ManagedProcess",
    "free_port",
    "http_ok",
    "start_dev_issuer",
    "start_process",
    "wait_http",
]

# Children run from the checkout so `python -m broker...` imports this tree's code.
REPO_ROOT = Path(__file__).resolve().parents[1]


class DevIssuer:
    """Handle on a running `python -m broker.dev.issuer` process, driven over its HTTP API."""

    def __init__(self, process: ManagedProcess, url: str) -> None:
        self.process = process
        self.url = url

    def _post(self, path: str, body: Mapping[str, object]) -> dict[str, object]:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, object] = json.load(response)
            return result

    def mint(
        self,
        preset: str = "gitlab",
        *,
        audience: str | list[str] = "luigi-creds",
        alg: str = "RS256",
        ttl: int = 300,
        header: Mapping[str, object] | None = None,
        claims: Mapping[str, object] | None = None,
        **claim_overrides: object,
    ) -> str:
        """A token of `preset` signed by the active `alg` key; a claim set to None is removed."""
        body = {
            "preset": preset,
            "audience": audience,
            "alg": alg,
            "ttl": ttl,
            "header": dict(header or {}),
            "claims": {**(claims or {}), **claim_overrides},
        }
        return str(self._post("/token", body)["token"])

    def rotate(self, alg: str = "RS256", *, drop_old: bool = False) -> str:
        """Publish a new active key for `alg` and return its kid."""
        return str(self._post("/rotate", {"alg": alg, "drop_old": drop_old})["kid"])

    def set_faults(self, *, jwks: str | None = None, discovery: str | None = None) -> None:
        """Make /jwks or discovery misbehave: ok, html, bad_json, 500, slow or redirect."""
        faults = {k: v for k, v in {"jwks": jwks, "discovery": discovery}.items() if v}
        self._post("/faults", faults)

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url + "/stats", timeout=10) as response:
            return {str(k): int(v) for k, v in json.load(response).items()}

    def stop(self) -> int:
        return self.process.stop()


def _announced_url(log_path: Path) -> str | None:
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        if line.startswith('{"issuer"'):
            return str(json.loads(line)["issuer"])
    return None


def start_dev_issuer(
    workdir: Path, *, algs: str = "RS256,ES256", issuer_url: str | None = None
) -> DevIssuer:
    """Start the local OIDC issuer on a free loopback port; keys and log live under `workdir`."""
    log_path = workdir / "dev-issuer.log"
    restarts = 1
    while log_path.exists():  # a restart in the same dir must not read the old announcement
        restarts += 1
        log_path = workdir / f"dev-issuer-{restarts}.log"
    argv = [
        sys.executable,
        "-m",
        "broker.dev.issuer",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--state-dir",
        str(workdir / "dev-issuer-state"),
        "--algs",
        algs,
    ]
    if issuer_url is not None:
        argv += ["--issuer-url", issuer_url]
    process = start_process(
        argv,
        log_path=log_path,
        ready=lambda: _announced_url(log_path) is not None,
        cwd=REPO_ROOT,
    )
    url = _announced_url(log_path)
    assert url is not None
    return DevIssuer(process, url)
