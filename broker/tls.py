"""The broker's TLS certificate, renewed on disk and served without a restart.

`tls_cert_file`/`tls_key_file` are read again on SIGHUP and whenever either file changes (its
inode, size or mtime, or where a symlink points: cert-manager and Kubernetes secret volumes swap a
`..data` symlink). A renewed pair is loaded into a fresh `ssl.SSLContext`, which then becomes
the one new handshakes use: the listening socket's context hands each new connection over to it
from its SNI callback (called for every ClientHello, with or without a server name). Connections
already open keep their certificate; nothing is dropped, and no handshake ever sees a context
half way through a load (loading into the live context in place would leave a window with the
new certificate and the old key, where a handshake fails).

A pair that does not load (half-written, the key not matching the certificate, unreadable) is
refused and logged, and the previous context stays in service. The pair is read once into
memory, so a renewal landing during the load cannot mix two pairs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from broker.background import Periodic

log = logging.getLogger("broker.tls")

_Stamp = tuple[tuple[str, int, int, int], ...]


class CertificateReloader:
    """Keeps `context` serving the pair currently on disk; see the module docstring."""

    def __init__(self, context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
        self.context = context  # the listening socket's; it serves until the first reload
        self._current = context  # what new handshakes use: swapped whole, never edited
        context.sni_callback = self._hand_over
        self._files = (cert_file, key_file)
        self._stamp = self._current_stamp()
        self._watcher = Periodic("tls-reload", self._tick)
        self.served = _describe(cert_file.read_bytes())

    def reload(self) -> bool:
        """Load the pair on disk into the live context; False (and logged) if it is refused."""
        self._stamp = self._current_stamp()
        try:
            cert_pem, key_pem = (path.read_bytes() for path in self._files)
            fresh = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            fresh.minimum_version = self.context.minimum_version
            fresh.options = self.context.options
            with _private_copies(cert_pem, key_pem) as (cert_path, key_path):
                fresh.load_cert_chain(cert_path, key_path)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error(
                "TLS certificate not reloaded; the previous one is still served",
                extra={"reason": f"{type(exc).__name__}: {exc}"[:300], "serving": self.served},
            )
            return False
        self._current = fresh  # one reference assignment: the next handshake gets it whole
        self.served = _describe(cert_pem)
        log.info("TLS certificate reloaded", extra={"serving": self.served})
        return True

    def _hand_over(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        """SNI callback of the listening context: move a new connection to the current one."""
        current = self._current
        if current is not self.context:
            connection.context = current

    def changed(self) -> bool:
        return self._current_stamp() != self._stamp

    def request_reload(self) -> None:
        """Ask the watcher to reload now (safe from a signal handler: it only sets an event)."""
        self._watcher.request()

    def start(self, interval: float) -> None:
        """Watch the files every `interval` seconds (0: only on request_reload) in a thread."""
        self._watcher.start(interval)

    def stop(self) -> None:
        self._watcher.stop()

    def _tick(self, requested: bool) -> None:
        if requested or self.changed():
            self.reload()

    def _current_stamp(self) -> _Stamp:
        stamps = []
        for path in self._files:
            try:
                info = path.stat()
                stamps.append((os.path.realpath(path), info.st_ino, info.st_size, info.st_mtime_ns))
            except OSError:
                stamps.append((str(path), -1, -1, -1))  # missing now: a change to watch for
        return tuple(stamps)


@contextlib.contextmanager
def _private_copies(cert_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    """Paths `load_cert_chain` can read the two in-memory copies from, readable by us only.

    Linux: anonymous memory files, so the private key is never written to a disk. Elsewhere: a
    0700 temporary directory, removed at once.
    """
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create(name, os.MFD_CLOEXEC) for name in ("tls-cert", "tls-key")]
        try:
            for fd, data in zip(fds, (cert_pem, key_pem), strict=True):
                os.write(fd, data)
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="luigi-creds-tls-") as tmp:  # pragma: no cover
        paths = []
        for name, data in (("cert.pem", cert_pem), ("key.pem", key_pem)):
            path = Path(tmp, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            paths.append(str(path))
        yield paths[0], paths[1]


def _describe(cert_pem: bytes) -> str:
    """The served certificate for the log: SHA-256 fingerprint and expiry (no key material)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return "unparsable certificate"
    fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()[:16]
    return f"sha256:{fingerprint} not_after={cert.not_valid_after_utc.isoformat()}"
