"""broker.mint.sigv4 against botocore's SigV4Auth: the same headers, byte for byte, for the
requests the broker signs (unit test; moto verifies real signatures in the AWS tests)."""

from __future__ import annotations

import secrets
import string
from datetime import datetime
from urllib.parse import quote, urlencode, urlsplit

import botocore.auth
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from broker.mint.keepalive import ConnectionPool
from broker.mint.sigv4 import FrozenCredentials, SigV4Signer
from broker.mint.sts_http import _form

FORM = "application/x-www-form-urlencoded; charset=utf-8"


def botocore_headers(
    url: str, region: str, creds: Credentials, body: bytes, when: datetime
) -> dict[str, str]:
    request = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": FORM})
    original = botocore.auth.get_current_datetime
    botocore.auth.get_current_datetime = lambda: when  # type: ignore[assignment]
    try:
        SigV4Auth(creds, "sts", region).add_auth(request)
    finally:
        botocore.auth.get_current_datetime = original
    return dict(request.headers.items())


def random_credentials(token: bool) -> Credentials:
    # Made at run time: no key-shaped literal in the repository.
    key_id = "AKIA" + "".join(secrets.choice(string.ascii_uppercase) for _ in range(16))
    secret = secrets.token_urlsafe(30)
    return Credentials(key_id, secret, secrets.token_urlsafe(200) if token else None)


@pytest.mark.parametrize(
    ("url", "region"),
    [
        ("https://sts.amazonaws.com/", "us-east-1"),
        ("https://sts.eu-west-1.amazonaws.com/", "eu-west-1"),
        ("http://127.0.0.1:5000/", "eu-west-1"),
        ("https://STS.Example.internal:443/", "us-west-2"),
        ("http://localhost:8080/prefix/sts/", "ap-south-1"),
    ],
)
@pytest.mark.parametrize("token", [False, True])
def test_headers_match_botocore(url: str, region: str, token: bool) -> None:
    creds = random_credentials(token)
    body = urlencode(
        {
            "Action": "AssumeRole",
            "Version": "2011-06-15",
            "RoleArn": "arn:aws:iam::123456789012:role/etl-writer",
            "RoleSessionName": "etl-writer-req1",
            "Tags.member.1.Value": "nightly load/é+&=",
            "Policy": '{"Version":"2012-10-17","Statement":[]}',
        },
        quote_via=quote,
    ).encode()
    when = datetime(2026, 12, 2, 1, 2, 3)
    expected = botocore_headers(url, region, creds, body, when)
    parts = urlsplit(url)
    pool = ConnectionPool(parts, timeout=1)
    signer = SigV4Signer(host=pool.host_header, path=parts.path, region=region, service="sts")
    frozen = creds.get_frozen_credentials()
    ours = FrozenCredentials(frozen.access_key, frozen.secret_key, frozen.token)
    # The second request is signed with the kept signing key: the same headers again.
    for _ in range(2):
        assert signer.headers(ours, body, FORM, timestamp="20261202T010203Z") == expected


def test_the_form_is_what_urlencode_writes() -> None:
    fields = {
        "Action": "AssumeRole",
        "RoleArn": "arn:aws:iam::1:role/a-b_c.d~e",
        "Tags.member.1.Value": "nightly load/é+&=%",
        "Policy": '{"a":["*"]}',
        "Empty": "",
    }
    assert _form(fields) == urlencode(fields, quote_via=quote).encode()


def test_answers_are_read_by_local_name_in_any_namespace_or_none() -> None:
    """`_find` finds what ElementTree's `{*}a/{*}b` finds."""
    import xml.etree.ElementTree as ET

    from broker.mint.sts_http import _find

    root = ET.fromstring(  # noqa: S314 (a constant written here)
        '<R xmlns="urn:a"><X/><Result><Credentials><Key>k</Key></Credentials></Result>'
        '<Plain xmlns=""><Key>p</Key></Plain><Other xmlns="urn:b"><Key>o</Key></Other>'
        "<NotKey/></R>"
    )
    for path in ("Result/Credentials/Key", "Plain/Key", "Other/Key", "Key", "Result/Missing", "X"):
        expected = root.find("/".join(f"{{*}}{step}" for step in path.split("/")))
        assert _find(root, path) is expected
    assert _find(root, "Result/Credentials/Key").text == "k"  # type: ignore[union-attr]
