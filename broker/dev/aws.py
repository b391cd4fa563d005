"""moto in server mode with IAM enforcement on: the AWS that the dev stack and the tests talk to.

Owns starting `moto_server`, creating in it the identities a real account would have (an
administrator for setup, the broker's own IAM user allowed only to assume roles), turning on
moto's request authentication and authorisation, and creating target roles with a trust policy
naming the broker and a permission policy of their own. From then on moto checks every request's
SigV4 signature against a key it issued, refuses unknown keys and wrong session tokens, and
evaluates the caller's identity policies (actions and resources, wildcards included) and, for
AssumeRole, the role's trust policy principal.

What moto does not enforce (so tests cover it another way): credential expiry (an STS key works
until moto stops), condition keys in identity policies (a Condition is treated as met, so an
Allow with one always allows and a Deny with one always denies), trust-policy conditions other
than `StringEquals` on `sts:ExternalId` (session tags, source identity and `aws:TagKeys` are not
checked; and a call with no ExternalId at all passes that one), session policies (an inline
Policy is accepted and ignored), permission boundaries and resource policies (bucket policies).

Talks to moto over loopback HTTP: boto3 for IAM and S3, urllib for moto's own /moto-api/.
"""

from __future__ import annotations

import json
import secrets
import string
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.dev.processes import ManagedProcess, free_port, start_process
from broker.errors import BrokerException

ACCOUNT = "123456789012"  # moto's default account id
REGION = "us-east-1"
ADMIN_USER = "luigi-creds-admin"
BROKER_USER = "luigi-creds-broker"
# What the broker needs towards STS, and nothing else: AssumeRole with session tags and a source
# identity, on roles of this account only.
BROKER_ACTIONS = ("sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity")
# An S3 grant's usual rights on one prefix or bucket.
S3_OBJECT_ACTIONS = ("s3:PutObject", "s3:GetObject", "s3:DeleteObject")


class MotoAuthError(BrokerException, RuntimeError):
    """moto did not start refusing unsigned or unknown callers; nothing would be checked."""


@dataclass(frozen=True)
class AwsKeys:
    """An IAM user's long-lived access key, issued by moto (fake, but checked by it)."""

    access_key_id: str
    secret_access_key: str

    def env(self) -> dict[str, str]:
        """The environment a process (the broker) signs its AWS requests with."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def __repr__(self) -> str:
        return f"AwsKeys({self.access_key_id!r}, secret_access_key=...)"


@dataclass(frozen=True)
class Allow:
    """One Allow statement of a role's permission policy."""

    actions: tuple[str, ...]
    resources: tuple[str, ...]

    def statement(self) -> dict[str, Any]:
        return {"Effect": "Allow", "Action": list(self.actions), "Resource": list(self.resources)}


def s3_objects(bucket: str, prefix: str = "") -> Allow:
    """Put, get and delete objects under `bucket`/`prefix`."""
    return Allow(S3_OBJECT_ACTIONS, (f"arn:aws:s3:::{bucket}/{prefix}*",))


def session(keys: AwsKeys, token: str | None = None) -> Any:
    import boto3

    return boto3.session.Session(
        aws_access_key_id=keys.access_key_id,
        aws_secret_access_key=keys.secret_access_key,
        aws_session_token=token,
        region_name=REGION,
    )


@dataclass
class MotoServer:
    """A running `moto_server` that authenticates and authorises every AWS request."""

    process: ManagedProcess
    url: str
    admin: AwsKeys
    broker: AwsKeys
    broker_arn: str

    def client(self, service: str, keys: AwsKeys | None = None, token: str | None = None) -> Any:
        """A boto3 client signing with `keys` (default: the administrator)."""
        return session(keys or self.admin, token).client(service, endpoint_url=self.url)

    def create_role(
        self,
        name: str,
        allow: Sequence[Allow],
        *,
        trusted: str | None = None,
        external_id: str | None = None,
    ) -> str:
        """A role trusting `trusted` (default: the broker) with `allow` inline; returns its ARN.
        With `external_id` the trust requires that sts:ExternalId (moto checks this one)."""
        statement: dict[str, Any] = {
            "Effect": "Allow",
            "Principal": {"AWS": trusted or self.broker_arn},
            "Action": list(BROKER_ACTIONS),
        }
        if external_id is not None:
            statement["Condition"] = {"StringEquals": {"sts:ExternalId": external_id}}
        trust = {"Version": "2012-10-17", "Statement": [statement]}
        iam = self.client("iam")
        role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))
        if allow:
            iam.put_role_policy(
                RoleName=name,
                PolicyName=f"{name}-permissions",
                PolicyDocument=json.dumps(
                    {"Version": "2012-10-17", "Statement": [a.statement() for a in allow]}
                ),
            )
        return str(role["Role"]["Arn"])

    def stop(self) -> None:
        self.process.stop()


def _user(iam: Any, name: str, policy: dict[str, Any]) -> tuple[AwsKeys, str]:
    user = iam.create_user(UserName=name)["User"]
    iam.put_user_policy(
        UserName=name, PolicyName=f"{name}-permissions", PolicyDocument=json.dumps(policy)
    )
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return AwsKeys(key["AccessKeyId"], key["SecretAccessKey"]), str(user["Arn"])


def _enforce(url: str, unknown: AwsKeys) -> None:
    """Turn on moto's authentication for every request from now on, and check that it refuses."""
    request = urllib.request.Request(  # noqa: S310 (loopback http)
        url + "/moto-api/reset-auth",
        data=b"0",
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback http)
        response.read()
    from botocore.exceptions import ClientError

    try:
        session(unknown).client("sts", endpoint_url=url).get_caller_identity()
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "InvalidClientTokenId":
            return
        raise
    raise MotoAuthError(f"moto at {url} accepted a key it never issued")


def start_moto(log_path: Path, *, timeout: float = 60.0) -> MotoServer:
    """Start moto, create the administrator and the broker's user, then enforce IAM.

    moto authenticates nothing until told to; the users are created first, while it still
    accepts anyone, and then every request must be signed by a key moto issued.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_process(
        [_moto_server(), "-H", "127.0.0.1", "-p", str(port)],
        log_path=log_path,
        ready_url=url + "/moto-api/",
        timeout=timeout,
    )
    try:
        # A key moto never issued, made here: once enforcement is on it must be refused.
        nobody = AwsKeys(
            "AKIA"
            + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16)),
            secrets.token_urlsafe(30),
        )
        iam = session(nobody).client("iam", endpoint_url=url)
        admin, _ = _user(
            iam,
            ADMIN_USER,
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            },
        )
        broker, broker_arn = _user(
            iam,
            BROKER_USER,
            {
                "Version": "2012-10-17",
                "Statement": [
                    Allow(BROKER_ACTIONS, (f"arn:aws:iam::{ACCOUNT}:role/*",)).statement()
                ],
            },
        )
        _enforce(url, nobody)
    except BaseException:
        process.stop()
        raise
    return MotoServer(process, url, admin, broker, broker_arn)


def _moto_server() -> str:
    """moto's console script beside this interpreter (the venv), else the name for PATH."""
    import sys

    beside = Path(sys.executable).parent / "moto_server"
    return str(beside) if beside.exists() else "moto_server"
