"""The boto3 bridge: sessions whose credentials refresh themselves through the broker.

Owns attaching broker-minted STS credentials to boto3 through botocore's public API only: a
`CredentialProvider` returning `RefreshableCredentials`, the only provider of the session's
`credential_provider` resolver, and `boto3.Session(botocore_session=...)`. botocore then does the
two-window refresh itself (advisory: one thread refreshes, failures tolerated; mandatory: every
caller waits) and calls back into the broker client. Talks to AWS only through the boto3 clients
the caller builds; talks to the broker only through the `fetch` callable it is given.

Broker outages: botocore retries a failed advisory refresh on every API call and logs each failure
with a traceback. So a failed advisory refresh is answered here with the credential in hand (one
log line, next attempt after `Windows.advisory_backoff`), and only a failed mandatory refresh
reaches botocore, whose warning about our own `BrokerError` is cut to one line by a log filter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import botocore.session
from botocore.credentials import (
    CredentialProvider,
    CredentialResolver,
    DeferredRefreshableCredentials,
    RefreshableCredentials,
)

from luigi_creds.childenv import AWS_ENV_VARIABLES, scrub_aws_env
from luigi_creds.credentials import AwsCredentials, BrokerError
from luigi_creds.refresh import Windows

__all__ = [
    "AWS_ENV_VARIABLES",
    "BrokerCredentialProvider",
    "adopt_session",
    "aws_session",
    "credential_env",
    "first_use_credentials",
    "prepare_session",
    "refreshable_credentials",
    "scrub_aws_env",
    "session_loader",
]

METHOD = "luigi-creds"

log = logging.getLogger(__name__)


class _OneLineBrokerErrors(logging.Filter):
    """Turns botocore's "refresh failed" warning about a BrokerError into one line.

    BrokerError messages already name the broker, the grant and the reason, and never a secret;
    the traceback through botocore's refresh machinery says nothing more. Other records pass
    untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, BrokerError):
            record.msg = f"{record.getMessage()} {error}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


_botocore_log = logging.getLogger("botocore.credentials")
if not any(isinstance(f, _OneLineBrokerErrors) for f in _botocore_log.filters):
    _botocore_log.addFilter(_OneLineBrokerErrors())


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _metadata(creds: AwsCredentials) -> dict[str, str]:
    return {
        "access_key": creds.access_key_id,
        "secret_key": creds.secret_access_key,
        "token": creds.session_token,
        "expiry_time": creds.expires_at.astimezone(UTC).isoformat(),
    }


def refreshable_credentials(
    fetch: Callable[[], AwsCredentials],
    *,
    clock: Callable[[], datetime] = _utcnow,
    windows: Windows | None = None,
) -> RefreshableCredentials:
    """Fetch once and wrap the result in botocore credentials that call `fetch` again to refresh.

    botocore's fixed windows (15/10 minutes) would refresh a 15-minute credential on every call,
    so the windows are scaled to the first credential's lifetime (`refresh.Windows`).
    """
    first = fetch()
    advisory, mandatory, guard = _guarded(fetch, first, clock, windows or Windows())
    # NOTE: the public constructor is used rather than `create_from_metadata` because only it
    # accepts `time_fetcher`, which is how tests drive a six-hour task with a fake clock.
    return RefreshableCredentials(
        access_key=first.access_key_id,
        secret_key=first.secret_access_key,
        token=first.session_token,
        expiry_time=first.expires_at.astimezone(UTC),
        refresh_using=guard.refresh,
        method=METHOD,
        time_fetcher=clock,
        advisory_timeout=int(advisory.total_seconds()),
        mandatory_timeout=int(mandatory.total_seconds()),
    )


def _guarded(
    fetch: Callable[[], AwsCredentials],
    first: AwsCredentials,
    clock: Callable[[], datetime],
    windows: Windows,
) -> tuple[timedelta, timedelta, _AdvisoryGuard]:
    """The advisory and mandatory windows for `first`'s lifetime, and the guard that refreshes
    through `fetch` in them."""
    advisory, mandatory = windows.for_lifetime(first.expires_at - clock())
    guard = _AdvisoryGuard(
        fetch, first, clock=clock, mandatory=mandatory, backoff=windows.advisory_backoff
    )
    return advisory, mandatory, guard


class _FirstUse(DeferredRefreshableCredentials):
    """botocore credentials that fetch at their first use, then refresh as
    `refreshable_credentials` does, on windows scaled to the first credential's lifetime.

    botocore asks a session for its credentials before it builds a client; these let the client
    be built (the service model, the endpoint, the handlers: tens of milliseconds) while the
    first mint is still on its way, and wait only where a request is signed.
    """

    def __init__(
        self,
        fetch: Callable[[], AwsCredentials],
        *,
        clock: Callable[[], datetime],
        windows: Windows,
    ) -> None:
        super().__init__(self._first, METHOD, time_fetcher=clock)
        self._fetch = fetch
        self._clock = clock
        self._windows = windows

    def _first(self) -> dict[str, str]:
        # Called by botocore under its refresh lock, once (it then calls the guard).
        first = self._fetch()
        advisory, mandatory, guard = _guarded(self._fetch, first, self._clock, self._windows)
        self._advisory_refresh_timeout = int(advisory.total_seconds())
        self._mandatory_refresh_timeout = int(mandatory.total_seconds())
        self._refresh_using = guard.refresh
        return _metadata(first)


def first_use_credentials(
    fetch: Callable[[], AwsCredentials],
    *,
    clock: Callable[[], datetime] = _utcnow,
    windows: Windows | None = None,
) -> RefreshableCredentials:
    """`refreshable_credentials` that call `fetch` for the first time at their first use."""
    return _FirstUse(fetch, clock=clock, windows=windows or Windows())


class _AdvisoryGuard:
    """botocore's `refresh_using`: fetch, but never fail (or hammer the broker) in advisory time.

    botocore calls it under its refresh lock, one thread at a time, so the state needs no lock.
    """

    def __init__(
        self,
        fetch: Callable[[], AwsCredentials],
        current: AwsCredentials,
        *,
        clock: Callable[[], datetime],
        mandatory: timedelta,
        backoff: timedelta,
    ) -> None:
        self._fetch = fetch
        self._current = current
        self._clock = clock
        self._mandatory = mandatory
        self._backoff = backoff
        self._retry_at: datetime | None = None

    def refresh(self) -> dict[str, str]:
        now = self._clock()
        current = self._current
        advisory = current.expires_at - now > self._mandatory
        if advisory and self._retry_at is not None and now < self._retry_at:
            return _metadata(current)
        try:
            fresh = self._fetch()
        except Exception as exc:
            if not advisory:
                raise
            self._retry_at = now + self._backoff
            reason = exc if isinstance(exc, BrokerError) else type(exc).__name__
            log.warning(
                "refreshing AWS credentials for grant %r failed (%s); using the current ones "
                "(expire %s) and trying again after %s",
                current.grant,
                reason,
                current.expires_at.astimezone(UTC).isoformat(),
                self._retry_at.astimezone(UTC).isoformat(),
            )
            return _metadata(current)
        self._current = fresh
        self._retry_at = None
        return _metadata(fresh)


class BrokerCredentialProvider(CredentialProvider):
    """A botocore credential provider backed by the broker; always loads, never falls through."""

    METHOD = METHOD
    CANONICAL_NAME = "custom-luigi-creds"

    def __init__(
        self,
        fetch: Callable[[], AwsCredentials],
        *,
        clock: Callable[[], datetime] = _utcnow,
        windows: Windows | None = None,
        at_first_use: bool = False,
    ) -> None:
        super().__init__()
        self._fetch = fetch
        self._clock = clock
        self._windows = windows
        self._at_first_use = at_first_use

    def load(self) -> RefreshableCredentials:
        build = first_use_credentials if self._at_first_use else refreshable_credentials
        return build(self._fetch, clock=self._clock, windows=self._windows)


def aws_session(
    fetch: Callable[[], AwsCredentials],
    *,
    region_name: str | None = None,
    clock: Callable[[], datetime] = _utcnow,
    windows: Windows | None = None,
    loader: Any = None,
    at_first_use: bool = False,
) -> boto3.Session:
    """A boto3 Session whose credentials come from `fetch` and refresh themselves.

    With `at_first_use`, `fetch` is called for the first time where a request is first signed,
    not when a client is built (`first_use_credentials`).

    The session's only credential provider is the broker's, so a stray `AWS_ACCESS_KEY_ID` in
    the process cannot win.
    `loader` is the data loader of another boto3 Session to share (service models and endpoint
    data already read and parsed); it holds no credentials. In a process forked after
    `prepare_session()`, the first call takes the session prepared before the fork.
    """
    session = _take_prepared()
    if session is None:
        core = botocore.session.Session()
        if loader is not None:
            core.register_component("data_loader", loader)
        session = boto3.Session(botocore_session=core)
    else:
        core = session._session  # the botocore session the boto3 Session wraps
        if loader is not None:
            # Before any client reads a model from it; a boto3 Session's loader already
            # searches boto3's own data.
            core.register_component("data_loader", loader)
    if region_name is not None:
        core.set_config_variable("region", region_name)
    # Our provider always loads, so botocore's default chain behind it (env, config files,
    # container, instance metadata) would never be asked: a resolver of ours alone gives the
    # same credentials, without building that chain (it reads the config files; measured
    # 4.2 ms of CPU in a forked process), and a stray AWS_ACCESS_KEY_ID cannot win either.
    core.register_component(
        "credential_provider",
        CredentialResolver(
            [
                BrokerCredentialProvider(
                    fetch, clock=clock, windows=windows, at_first_use=at_first_use
                )
            ]
        ),
    )
    return session


# A session built before Luigi forks task processes, never given credentials, for the first
# aws_session() of each forked process: (the pid that built it, the session).
_prepared: tuple[int, boto3.Session] | None = None


def prepare_session() -> None:
    """Build, once in a process that forks task processes (a CredentialsMixin job's scheduling
    process), the boto3 Session that each forked task's first `aws_session()` takes.

    Building the session costs a forked task about 10 ms of CPU (measured in forked processes:
    a new session and an S3 client 26 ms, against 16 on a session prepared before the fork).
    Each forked process takes its own copy, once, and gives it only its own task's
    credentials; the process that built it never uses it, so nothing passes between tasks.
    """
    global _prepared
    if _prepared is not None and _prepared[0] == os.getpid():
        return
    _prepared = (os.getpid(), boto3.Session(botocore_session=botocore.session.Session()))


def _take_prepared() -> boto3.Session | None:
    global _prepared
    prepared, pid = _prepared, os.getpid()
    if prepared is None or prepared[0] == pid:
        return None
    _prepared = None  # taken once per process: a second session is built afresh
    return prepared[1]


def session_loader(session: Any) -> Any:
    """The data loader of a boto3 Session (by default boto3's default session), if any: the
    service models and endpoint data it has parsed (often in the scheduling process, before
    Luigi forked this one), which a new session can share. It holds no credentials."""
    core = getattr(session, "_session", None)  # boto3.Session's botocore session
    return core.get_component("data_loader") if core is not None else None


def adopt_session(
    session: Any, fetch: Callable[[], AwsCredentials], *, at_first_use: bool = False
) -> bool:
    """Make an existing boto3 Session resolve credentials from `fetch` alone (first called at
    the first use with `at_first_use`), forgetting the ones it had; False (nothing changed) if
    botocore does not look as expected.

    For a forked task process: the session it inherited has parsed service models and
    registered its handlers already (building a new one costs tens of milliseconds), but its
    credentials belong to the process it was forked from.
    """
    core = getattr(session, "_session", None)  # boto3.Session's botocore session
    # NOTE: botocore caches resolved credentials in `_credentials` and offers no public way
    # to drop them; if that ever changes, the caller builds a new session instead.
    if core is None or not hasattr(core, "_credentials"):
        return False
    core.register_component(
        "credential_provider",
        CredentialResolver([BrokerCredentialProvider(fetch, at_first_use=at_first_use)]),
    )
    core._credentials = None
    return True


def credential_env(creds: AwsCredentials, base: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Environment for a child process holding these (static) credentials.

    For children that outlive the credential, prefer the local endpoint (`serve.py`), which
    hands out refreshed credentials through the container-credentials protocol.
    """
    env = scrub_aws_env(base or {})
    env.update(
        {
            "AWS_ACCESS_KEY_ID": creds.access_key_id,
            "AWS_SECRET_ACCESS_KEY": creds.secret_access_key,
            "AWS_SESSION_TOKEN": creds.session_token,
            "AWS_CREDENTIAL_EXPIRATION": creds.credential_process()["Expiration"],
        }
    )
    return env
