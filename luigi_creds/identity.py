"""Where the job's identity comes from: OIDC token sources for the broker's token exchange.

Owns reading the subject token from the CI system or IdP the job runs under. Talks to GitHub
Actions' ID-token request URL and to Okta's token endpoint (client credentials with
`private_key_jwt`, signed through authlib); everything else comes from the environment mapping or
a file it is handed. The tokens themselves never appear in a repr, log line or exception.

`renewable` says whether a source can produce a *new* token on demand. The broker consumes a CI
token's `jti` once, so a lost refresh session can be re-established only from a renewable source
(file, GitHub, Okta); GitLab and Bitbucket hand the job one token for its lifetime.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import httpx

from luigi_creds.errors import LuigiCredsError
from luigi_creds.settings import DEFAULT_GITLAB_VARIABLE

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "DEFAULT_GITLAB_VARIABLE",
    "JWT_TOKEN_TYPE",
    "EnvTokenSource",
    "FileTokenSource",
    "GitHubTokenSource",
    "IdentityError",
    "OktaSettings",
    "OktaTokenSource",
    "TokenSource",
    "parse_token_source",
]

JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
BITBUCKET_VARIABLE = "BITBUCKET_STEP_OIDC_TOKEN"
GITHUB_URL_VARIABLE = "ACTIONS_ID_TOKEN_REQUEST_URL"
GITHUB_TOKEN_VARIABLE = "ACTIONS_ID_TOKEN_REQUEST_TOKEN"
# A JWT from any of our issuers is a few KiB; the broker refuses more than 8 KiB
# (an oversized token is an attack on its parser, not a credential).
MAX_TOKEN_BYTES = 16 * 1024


class IdentityError(LuigiCredsError):
    """The token source could not produce a token; the message names the source, never a token."""


class TokenSource(Protocol):
    """Something that yields the subject token for a token exchange."""

    @property
    def description(self) -> str:
        """Where tokens come from, safe to print (`env:VAR`, `github`, ...)."""
        ...

    @property
    def renewable(self) -> bool:
        """True if `token()` can return a new token, not only the one the job started with."""
        ...

    @property
    def subject_token_type(self) -> str:
        """The RFC 8693 `subject_token_type` URN for tokens from this source."""
        ...

    def token(self) -> str:
        """Return a subject token, fetching or re-reading as the source requires."""
        ...


def _checked(token: str, description: str) -> str:
    token = token.strip()
    if not token:
        raise IdentityError(f"token source {description}: the token is empty")
    if len(token) > MAX_TOKEN_BYTES:
        raise IdentityError(f"token source {description}: the token is larger than 16 KiB")
    return token


@dataclass(frozen=True)
class EnvTokenSource:
    """A token in an environment variable: `env:VAR`, GitLab `id_tokens`, Bitbucket."""

    variable: str
    environ: Mapping[str, str] = field(repr=False, compare=False)
    label: str = ""
    subject_token_type: str = JWT_TOKEN_TYPE
    renewable: bool = False

    @property
    def description(self) -> str:
        return self.label or f"env:{self.variable}"

    def token(self) -> str:
        value = self.environ.get(self.variable)
        if value is None:
            raise IdentityError(
                f"token source {self.description}: environment variable {self.variable} is not set"
            )
        return _checked(value, self.description)


@dataclass(frozen=True)
class FileTokenSource:
    """A token in a file, re-read on every use (Kubernetes projected tokens rotate in place)."""

    path: Path
    subject_token_type: str = JWT_TOKEN_TYPE
    renewable: bool = True

    @property
    def description(self) -> str:
        return f"file:{self.path}"

    def token(self) -> str:
        try:
            with self.path.open("rb") as f:
                raw = f.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise IdentityError(
                f"token source {self.description}: cannot read the file ({exc.strerror})"
            ) from None
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise IdentityError(f"token source {self.description}: not an ASCII token") from None
        return _checked(text, self.description)


@dataclass(frozen=True)
class GitHubTokenSource:
    """GitHub Actions: GET the request URL with `&audience=`, bearer = the request token.

    Needs `permissions: id-token: write` in the workflow, which is what sets both variables.
    """

    request_url: str
    request_token: str = field(repr=False)
    audience: str
    http: httpx.Client = field(repr=False, compare=False)
    subject_token_type: str = JWT_TOKEN_TYPE
    renewable: bool = True
    description: str = "github"

    def token(self) -> str:
        separator = "&" if "?" in self.request_url else "?"
        url = f"{self.request_url}{separator}audience={quote(self.audience, safe='')}"
        try:
            response = self.http.get(
                url,
                headers={
                    "Authorization": f"bearer {self.request_token}",
                    "Accept": "application/json; api-version=2.0",
                },
            )
        except httpx.HTTPError as exc:
            raise IdentityError(
                f"token source github: request to the ID-token URL failed ({type(exc).__name__})"
            ) from None
        if response.status_code != 200:
            raise IdentityError(
                f"token source github: the ID-token URL answered HTTP {response.status_code}"
            )
        try:
            value = response.json()["value"]
        except (ValueError, KeyError, TypeError):
            raise IdentityError("token source github: the answer has no 'value'") from None
        if not isinstance(value, str):
            raise IdentityError("token source github: 'value' is not a string")
        return _checked(value, self.description)


@dataclass(frozen=True)
class OktaSettings:
    """Okta client-credentials settings (all public; the private key stays in its file)."""

    token_endpoint: str  # e.g. https://example.okta.com/oauth2/<server id>/v1/token
    client_id: str
    private_key_file: Path
    scopes: tuple[str, ...] = ()
    key_id: str | None = None


class OktaTokenSource:
    """Okta client credentials with `private_key_jwt` (RFC 7523), signed through authlib.

    The access token is cached until 60 s before its `expires_in`, so each job asks Okta once an
    hour at most; `token()` after that returns a new one, which makes this source renewable.
    """

    renewable = True
    subject_token_type = ACCESS_TOKEN_TYPE
    description = "okta"
    # Refetch this long before Okta's expires_in so the broker still accepts the token.
    EARLY = timedelta(seconds=60)

    def __init__(
        self, settings: OktaSettings, *, http: httpx.Client, clock: Callable[[], datetime]
    ) -> None:
        self._settings = settings
        self._http = http
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[str, datetime] | None = None

    def __repr__(self) -> str:
        return f"OktaTokenSource(client_id={self._settings.client_id!r})"

    def token(self) -> str:
        with self._lock:
            now = self._clock()
            if self._cached is not None and now < self._cached[1]:
                return self._cached[0]
            value, lifetime = self._fetch()
            self._cached = (value, now + max(lifetime - self.EARLY, timedelta(0)))
            return value

    def _fetch(self) -> tuple[str, timedelta]:
        # authlib ships no type information.
        from authlib.oauth2.rfc7523 import private_key_jwt_sign  # type: ignore[import-untyped]

        s = self._settings
        key, alg = _load_private_key(s.private_key_file)
        assertion = private_key_jwt_sign(
            key,
            s.client_id,
            s.token_endpoint,
            alg=alg,
            header={"kid": s.key_id} if s.key_id else None,
        )
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        }
        if s.scopes:
            form["scope"] = " ".join(s.scopes)
        try:
            response = self._http.post(
                s.token_endpoint, data=form, headers={"Accept": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise IdentityError(
                f"token source okta: request to {s.token_endpoint} failed ({type(exc).__name__})"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200 or not isinstance(body, dict):
            code = body.get("error", "") if isinstance(body, dict) else ""
            raise IdentityError(
                f"token source okta: {s.token_endpoint} answered HTTP {response.status_code}"
                + (f" ({code})" if isinstance(code, str) and code else "")
            )
        value = body.get("access_token")
        if not isinstance(value, str):
            raise IdentityError("token source okta: the answer has no access_token")
        expires_in = body.get("expires_in", 3600)
        seconds = expires_in if isinstance(expires_in, int) and expires_in > 0 else 3600
        return _checked(value, self.description), timedelta(seconds=seconds)


def _load_private_key(path: Path) -> tuple[object, str]:
    """Return the joserfc key and its signing algorithm (Okta accepts RS256 and ES256)."""
    from joserfc.errors import JoseError
    from joserfc.jwk import ECKey, RSAKey

    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise IdentityError(
            f"token source okta: cannot read the private key file {path} ({exc.strerror})"
        ) from None
    # NOTE: the key type is given explicitly; joserfc warns (SecurityWarning) on implicit types.
    try:
        return RSAKey.import_key(pem), "RS256"
    except (JoseError, ValueError, TypeError):
        pass
    try:
        return ECKey.import_key(pem), "ES256"
    except (JoseError, ValueError, TypeError):
        pass
    raise IdentityError(f"token source okta: {path} holds no RSA or EC private key")


def parse_token_source(
    spec: str,
    *,
    environ: Mapping[str, str],
    http: httpx.Client,
    audience: str,
    clock: Callable[[], datetime],
    gitlab_variable: str = DEFAULT_GITLAB_VARIABLE,
    okta: OktaSettings | None = None,
) -> TokenSource:
    """Build the token source named by `[luigi_creds] token_source`.

    `env:VAR` | `file:PATH` | `gitlab` | `github` | `bitbucket` | `okta`. `audience` is what the
    GitHub source asks for (the broker's configured audience, usually its URL).
    """
    spec = spec.strip()
    kind, _, argument = spec.partition(":")
    if kind == "env" and argument:
        return EnvTokenSource(argument, environ)
    if kind == "file" and argument:
        return FileTokenSource(Path(argument).expanduser())
    if argument:
        raise IdentityError(f"unknown token_source {spec!r}")
    if kind == "gitlab":
        return EnvTokenSource(gitlab_variable, environ, label="gitlab")
    if kind == "bitbucket":
        return EnvTokenSource(BITBUCKET_VARIABLE, environ, label="bitbucket")
    if kind == "github":
        url = environ.get(GITHUB_URL_VARIABLE)
        bearer = environ.get(GITHUB_TOKEN_VARIABLE)
        if not url or not bearer:
            raise IdentityError(
                f"token source github: {GITHUB_URL_VARIABLE} and {GITHUB_TOKEN_VARIABLE} must be "
                "set (give the workflow `permissions: id-token: write`)"
            )
        return GitHubTokenSource(url, bearer, audience, http)
    if kind == "okta":
        if okta is None:
            raise IdentityError(
                "token source okta needs okta_token_endpoint, okta_client_id and "
                "okta_private_key_file in [luigi_creds]"
            )
        return OktaTokenSource(okta, http=http, clock=clock)
    raise IdentityError(
        f"unknown token_source {spec!r}; use env:VAR, file:PATH, gitlab, github, bitbucket or okta"
    )
