"""One loopback rule (broker/loopback.py) for the listen address, config URLs and issuer fetches.

Unit: the edge cases and their decisions. Then the same hosts through the config lint (listen
and an issuer's http:// URL) and the issuer registry (fetch or refuse as `insecure_url`), which
must agree with the rule: a host the lint accepts is one the registry fetches from.
"""

from __future__ import annotations

import contextlib

import pytest
from test_config import ISSUERS, grant
from test_issuers import FakeIdP, registry_for

from broker.config import ConfigError
from broker.config_lint import parse_config
from broker.issuers import IssuerUnavailable
from broker.loopback import is_loopback_host

EDGES = [
    ("localhost", True),
    ("LocalHost", True),  # host names are case-insensitive
    ("127.0.0.1", True),
    ("127.255.255.254", True),  # all of 127.0.0.0/8
    ("::1", True),
    ("[::1]", True),  # the URL / listen spelling
    ("0:0:0:0:0:0:0:1", True),
    ("localhost.", False),  # left to DNS
    ("evil.localhost", False),
    ("0.0.0.0", False),  # noqa: S104 - every interface
    ("::", False),
    ("[::]", False),
    ("::ffff:127.0.0.1", False),  # IPv4-mapped: refused on every Python version
    ("[127.0.0.1]", False),  # brackets hold IPv6 only
    ("[::1", False),
    ("::1]", False),
    ("127.1", False),  # no inet_aton short forms
    ("0177.0.0.1", False),  # nor octal
    (" 127.0.0.1", False),
    ("128.0.0.1", False),
    ("10.0.0.1", False),
    ("", False),
]


@pytest.mark.parametrize(("host", "loopback"), EDGES)
def test_the_loopback_rule(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


URL_HOSTS = [(h, ok) for h, ok in EDGES if h and " " not in h and h.count("[") == h.count("]")]


@pytest.mark.parametrize(("host", "loopback"), URL_HOSTS)
def test_the_lint_listen_check_follows_the_rule(host: str, loopback: bool) -> None:
    """Plain HTTP `listen` without TLS is accepted exactly on the rule's loopback hosts."""
    text = ISSUERS + grant('project_id = "1"') + f'\n[broker]\nlisten = "{host}:8480"\n'
    if loopback:
        parse_config(text)
    else:
        with pytest.raises(ConfigError) as info:
            parse_config(text)
        assert [p.where for p in info.value.problems] == ["broker.listen"]


@pytest.mark.parametrize(("host", "loopback"), URL_HOSTS)
def test_the_issuer_registry_and_the_lint_agree(host: str, loopback: bool) -> None:
    """An http:// issuer: the lint accepts it and the registry fetches from it, or both refuse
    (the registry without sending anything)."""
    url = f"http://{_bracketed(host)}:8080"
    text = (
        f'[[issuer]]\nname = "idp"\nurl = "{url}"\naudiences = ["luigi-creds"]\n'
        'subject_claim = "sub"\n'
    )
    try:
        parse_config(text + '[[grant]]\nname = "g"\nissuer = "idp"\n')
        linted = True
    except ConfigError as exc:
        linted = not any(p.where.startswith("issuer[idp].url") for p in exc.problems)
    assert linted is loopback
    idp = FakeIdP(url)
    registry, config, _, outcomes = registry_for(idp)
    # The fake answers only its exact URL spelling ("LocalHost" arrives lowercased).
    with contextlib.suppress(IssuerUnavailable):
        registry.resolve_key(config, idp.keys[0].kid, "ES256")
    if loopback:
        assert idp.paths and ("idp", "insecure_url") not in outcomes
    else:
        assert idp.paths == [] and outcomes == [("idp", "insecure_url")]
