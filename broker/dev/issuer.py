"""A local OIDC issuer for development and tests: signing keys, compact JWS, and an HTTP server.

Owns generated signing keys (RS256, PS256, ES256, EdDSA), JWT encoding, and a small loopback HTTP
server that publishes OpenID discovery and a JWKS and signs tokens with the claim presets of
`broker.dev.claims`. It stands in for GitLab, GitHub, Bitbucket and Okta in integration tests and
in `luigi-creds-broker dev`; it talks to nobody, and only ever listens on a loopback address.

Endpoints:
  GET  /.well-known/openid-configuration   discovery (issuer, jwks_uri on the same origin)
  GET  /jwks                               public keys of every published key
  POST /token   {"preset", "audience", "claims", "ttl", "alg", "header"} -> {"token": ...}
  POST /rotate  {"alg", "drop_old"} -> {"kid": new active kid}
  POST /faults  {"jwks": mode, "discovery": mode}, mode in ok|html|bad_json|500|slow|redirect
  GET  /stats   {"jwks_fetches": n, "discovery_fetches": n, "tokens": n}

`python -m broker.dev.issuer --port 0 --state-dir DIR` prints `{"issuer": URL, "port": N}` on
one stdout line once listening and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, TextIO

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from broker.dev.claims import PRESETS, preset_claims

ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
FAULT_MODES = ("ok", "html", "bad_json", "500", "slow", "redirect")
# RSA 2048 is the size GitLab and GitHub publish; e=65537 per RFC 7518 §6.3.1 practice.
RSA_BITS = 2048
# Requests to /token, /rotate and /faults are tiny; cap what the server reads.
MAX_REQUEST_BYTES = 64 * 1024
# The "slow" fault drips one byte this often, for at most this long: longer than any client's
# total deadline (issuers.py: 5 s), short enough that a test run never hangs on it.
DRIP_INTERVAL_SECONDS = 0.5
DRIP_MAX_SECONDS = 20.0
# How often serve_forever checks for shutdown (stdlib default 0.5 s); tests stop many issuers.
SHUTDOWN_POLL_SECONDS = 0.05

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_uint(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url(value.to_bytes(size, "big"))


def _canonical_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


@dataclass(frozen=True)
class SigningKey:
    """A private signing key with its JWS algorithm and key id; the private part never prints."""

    alg: str
    kid: str
    private_key: PrivateKey = field(repr=False)

    @classmethod
    def generate(cls, alg: str, *, kid: str | None = None, random_kid: bool = False) -> SigningKey:
        """A fresh key for `alg`; `kid` defaults to the RFC 7638 thumbprint (or random)."""
        private_key: PrivateKey
        if alg in ("RS256", "PS256"):
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        elif alg == "ES256":
            private_key = ec.generate_private_key(ec.SECP256R1())
        elif alg == "EdDSA":
            private_key = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(f"unsupported algorithm {alg!r}; expected one of {ALGORITHMS}")
        if kid is None:
            kid = secrets.token_urlsafe(12) if random_kid else _thumbprint(private_key)
        return cls(alg=alg, kid=kid, private_key=private_key)

    def thumbprint(self) -> str:
        """RFC 7638 JWK thumbprint (SHA-256, base64url) of the public key."""
        return _thumbprint(self.private_key)

    def public_jwk(self) -> dict[str, Any]:
        """The public key as a JWK with `kid`, `alg` and `use: sig`."""
        return {**_public_members(self.private_key), "kid": self.kid, "alg": self.alg, "use": "sig"}

    def sign(self, signing_input: bytes) -> bytes:
        """The JWS signature over `signing_input` (ES256: raw r||s, RFC 7518 §3.4, not DER)."""
        key = self.private_key
        if self.alg == "RS256" and isinstance(key, rsa.RSAPrivateKey):
            return key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        if self.alg == "PS256" and isinstance(key, rsa.RSAPrivateKey):
            # RFC 7518 §3.5: MGF1 with the same hash, salt length = hash length.
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            return key.sign(signing_input, pss, hashes.SHA256())
        if self.alg == "ES256" and isinstance(key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            # As a stock signer: s is high about half the time, and the broker accepts both.
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        if self.alg == "EdDSA" and isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(signing_input)
        raise ValueError(f"key type does not match algorithm {self.alg}")

    def to_json(self) -> dict[str, str]:
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return {"alg": self.alg, "kid": self.kid, "private_key_pem": pem.decode("ascii")}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SigningKey:
        loaded = serialization.load_pem_private_key(
            str(data["private_key_pem"]).encode("ascii"), password=None
        )
        if not isinstance(
            loaded, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        ):
            raise ValueError("unsupported private key type")
        return cls(alg=str(data["alg"]), kid=str(data["kid"]), private_key=loaded)

    def write(self, path: Path) -> None:
        """Write the private key as JSON to `path`, readable by the owner only (0600)."""
        write_private_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> SigningKey:
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


def write_private_json(path: Path, value: Any) -> None:
    """Atomically write `value` as JSON to `path` with mode 0600 from the first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(value, handle)
    os.replace(tmp, path)


def _public_members(key: PrivateKey) -> dict[str, str]:
    """The required public JWK members (RFC 7638 §3.2), lexicographic order irrelevant here."""
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        return {"kty": "RSA", "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}
    if isinstance(key, ec.EllipticCurvePrivateKey):
        point = key.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64url_uint(point.x, 32),
            "y": _b64url_uint(point.y, 32),
        }
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}


def _thumbprint(key: PrivateKey) -> str:
    return b64url(hashlib.sha256(_canonical_json(_public_members(key))).digest())


def encode_jwt(
    claims: Mapping[str, Any], key: SigningKey, *, header: Mapping[str, Any] | None = None
) -> str:
    """Sign `claims` with `key` as a compact JWS.

    The header is `{"alg", "typ": "JWT", "kid"}` updated with `header`; a None value there drops
    the member (e.g. `{"kid": None}` for a token without a kid). Tests use `header` to forge
    hostile headers; the signature is always made by `key` with `key.alg`.
    """
    full_header: dict[str, Any] = {"alg": key.alg, "typ": "JWT", "kid": key.kid}
    for name, value in (header or {}).items():
        if value is None:
            full_header.pop(name, None)
        else:
            full_header[name] = value
    signing_input = (
        b64url(json.dumps(full_header, separators=(",", ":")).encode("utf-8"))
        + "."
        + b64url(json.dumps(dict(claims), separators=(",", ":")).encode("utf-8"))
    )
    return signing_input + "." + b64url(key.sign(signing_input.encode("ascii")))


class IssuerState:
    """Keys, fault knobs and counters of one issuer; every method is thread-safe."""

    def __init__(self, issuer_url: str, *, state_dir: Path | None = None) -> None:
        self.issuer_url = issuer_url
        self.state_dir = state_dir
        self._lock = threading.Lock()
        # alg -> keys in publication order; the last one is the active signer for that alg.
        self._keys: dict[str, list[SigningKey]] = {}
        self._faults: dict[str, str] = {"jwks": "ok", "discovery": "ok"}
        self._stats: dict[str, int] = {"jwks_fetches": 0, "discovery_fetches": 0, "tokens": 0}

    @property
    def keys_file(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "signing-keys.json"

    def load_or_generate(self, algorithms: Sequence[str]) -> None:
        """Reuse the keys saved in the state dir, else generate one per algorithm and save them."""
        keys_file = self.keys_file
        with self._lock:
            if keys_file is not None and keys_file.exists():
                for entry in json.loads(keys_file.read_text(encoding="utf-8")):
                    key = SigningKey.from_json(entry)
                    self._keys.setdefault(key.alg, []).append(key)
            for alg in algorithms:
                if alg not in self._keys:
                    self._keys[alg] = [SigningKey.generate(alg)]
            self._save_locked()

    def _save_locked(self) -> None:
        keys_file = self.keys_file
        if keys_file is None:
            return
        keys_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private_json(keys_file, [k.to_json() for ks in self._keys.values() for k in ks])

    def active_key(self, alg: str) -> SigningKey:
        """The active signer for `alg`, generated on first use for an algorithm not yet set up."""
        if alg not in ALGORITHMS:
            raise ValueError(f"unsupported algorithm {alg!r}")
        with self._lock:
            if alg not in self._keys:
                self._keys[alg] = [SigningKey.generate(alg)]
                self._save_locked()
            return self._keys[alg][-1]

    def rotate(self, alg: str, *, drop_old: bool = False) -> SigningKey:
        """Make a new active key for `alg`; older keys stay published unless `drop_old`."""
        if alg not in ALGORITHMS:
            raise ValueError(f"unsupported algorithm {alg!r}")
        new_key = SigningKey.generate(alg)
        with self._lock:
            keys = [] if drop_old else self._keys.get(alg, [])
            self._keys[alg] = [*keys, new_key]
            self._save_locked()
        return new_key

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            return {"keys": [k.public_jwk() for ks in self._keys.values() for k in ks]}

    def discovery(self) -> dict[str, Any]:
        with self._lock:
            algs = sorted(self._keys)
        origin = self.issuer_url.rstrip("/")
        return {
            "issuer": self.issuer_url,
            "jwks_uri": origin + "/jwks",
            "token_endpoint": origin + "/token",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algs,
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti"],
        }

    def mint(self, request: Mapping[str, Any], *, now: datetime) -> str:
        """Sign a token for a /token request body (see the module docstring)."""
        preset = request.get("preset", "gitlab")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}")
        overrides = request.get("claims") or {}
        header = request.get("header") or {}
        ttl = request.get("ttl", 300)
        if not isinstance(overrides, dict) or not isinstance(header, dict):
            raise ValueError("claims and header must be objects")
        if not isinstance(ttl, int) or isinstance(ttl, bool):
            raise ValueError("ttl must be an integer")
        key = self.active_key(str(request.get("alg", "RS256")))
        claims = preset_claims(
            preset,
            issuer=self.issuer_url,
            audience=request.get("audience", "luigi-creds"),
            now=now,
            ttl=ttl,
            overrides=overrides,
        )
        with self._lock:
            self._stats["tokens"] += 1
        return encode_jwt(claims, key, header=header)

    def set_faults(self, faults: Mapping[str, Any]) -> dict[str, str]:
        for name, mode in faults.items():
            if name not in self._faults or mode not in FAULT_MODES:
                raise ValueError(f"bad fault {name!r}={mode!r}")
        with self._lock:
            self._faults.update({str(k): str(v) for k, v in faults.items()})
            return dict(self._faults)

    def fault(self, name: str) -> str:
        with self._lock:
            return self._faults[name]

    def count(self, counter: str) -> None:
        with self._lock:
            self._stats[counter] += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)


class _Handler(BaseHTTPRequestHandler):
    server_version = "luigi-creds-dev-issuer"
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms on Linux) on every keep-alive request after the first.
    disable_nagle_algorithm = True
    state: ClassVar[IssuerState]
    log_stream: ClassVar[TextIO | None] = None

    def log_message(self, format: str, *args: Any) -> None:
        # One line per request on stderr (or the server's log stream); request bodies (which may
        # carry claims) never appear.
        stream = self.log_stream or sys.stderr
        stream.write(f"dev-issuer: {self.command} {self.path} {args[1] if len(args) > 1 else ''}\n")

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode("utf-8"))

    def _faulty(self, mode: str, good: Any) -> None:
        if mode == "ok":
            self._json(200, good)
        elif mode == "html":
            self._send(200, b"<html><body>Service temporarily down</body></html>", "text/html")
        elif mode == "bad_json":
            self._send(200, json.dumps(good).encode("utf-8")[:-7])
        elif mode == "500":
            self._json(500, {"error": "internal"})
        elif mode == "redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._drip(json.dumps(good).encode("utf-8"))

    def _drip(self, body: bytes) -> None:
        """Announce the full body, then send one byte per interval (a drip-feed server)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        deadline = time.monotonic() + DRIP_MAX_SECONDS
        try:
            for i in range(len(body)):
                if time.monotonic() > deadline:
                    break
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                time.sleep(DRIP_INTERVAL_SECONDS)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
        raw = self.rfile.read(length) if length else b"{}"
        value = json.loads(raw or b"{}")
        if not isinstance(value, dict):
            raise ValueError("request body must be a JSON object")
        return value

    def do_GET(self) -> None:
        state = self.state
        if self.path == "/.well-known/openid-configuration":
            state.count("discovery_fetches")
            self._faulty(state.fault("discovery"), state.discovery())
        elif self.path == "/jwks":
            state.count("jwks_fetches")
            self._faulty(state.fault("jwks"), state.jwks())
        elif self.path == "/stats":
            self._json(200, state.stats())
        elif self.path == "/healthz":
            self._json(200, {"ok": True})
        else:
            self._json(404, {"error": "not_found"})

    def do_POST(self) -> None:
        state = self.state
        try:
            body = self._read_json()
            if self.path == "/token":
                self._json(200, {"token": state.mint(body, now=datetime.now(UTC))})
            elif self.path == "/rotate":
                key = state.rotate(
                    str(body.get("alg", "RS256")), drop_old=bool(body.get("drop_old"))
                )
                self._json(200, {"kid": key.kid, "alg": key.alg})
            elif self.path == "/faults":
                self._json(200, state.set_faults(body))
            else:
                self._json(404, {"error": "not_found"})
        except (ValueError, TypeError) as exc:
            self._json(400, {"error": "bad_request", "detail": str(exc)})


def _loopback_host(host: str) -> str:
    """`host` if it is a loopback IP literal ('localhost' maps to 127.0.0.1); else ValueError."""
    if host == "localhost":
        return "127.0.0.1"
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"refusing to listen on non-loopback address {host}")
    return host


class IssuerServer:
    """The dev issuer's HTTP server on a loopback port, served from a background thread."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        issuer_url: str | None = None,
        state_dir: Path | None = None,
        algorithms: Sequence[str] = ("RS256", "ES256"),
        log_stream: TextIO | None = None,
    ) -> None:
        class Handler(_Handler):
            pass

        Handler.log_stream = log_stream

        self.httpd = ThreadingHTTPServer((_loopback_host(host), port), Handler)
        self.httpd.daemon_threads = True
        bound_host, bound_port = self.httpd.server_address[:2]
        self.port = int(bound_port)
        default_url = f"http://{bound_host!s}:{self.port}"
        self.state = IssuerState(issuer_url or default_url, state_dir=state_dir)
        self.state.load_or_generate(algorithms)
        Handler.state = self.state
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.state.issuer_url

    def start(self) -> IssuerServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=SHUTDOWN_POLL_SECONDS)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.dev.issuer", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--state-dir", type=Path, help="keep signing keys here (mode 0600)")
    parser.add_argument("--issuer-url", help="the `iss` to publish (default http://HOST:PORT)")
    parser.add_argument(
        "--algs", default="RS256,ES256", help="comma-separated algorithms to generate keys for"
    )
    args = parser.parse_args(argv)
    try:
        server = IssuerServer(
            host=args.host,
            port=args.port,
            issuer_url=args.issuer_url,
            state_dir=args.state_dir,
            algorithms=[a for a in args.algs.split(",") if a],
        )
    except ValueError as exc:
        parser.error(str(exc))

    def _shutdown(signum: int, frame: object) -> None:
        # shutdown() blocks until serve_forever returns, so it cannot run on the serving thread.
        threading.Thread(target=server.httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    print(json.dumps({"issuer": server.url, "port": server.port}), flush=True)
    server.serve_forever()
    server.httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
