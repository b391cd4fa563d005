"""What a child process is given, and what must never be shown: child environments and redaction.

Owns two rules. A child's environment carries no job-wide secret: AWS grants point it at the
job's agent (the container-credentials protocol, so its SDKs refresh by themselves) with a bearer
scoped to its task, stray `AWS_*` credential variables are removed, Vault tokens go in
`VAULT_TOKEN`, dynamic secrets in `LUIGI_CREDS_<GRANT>_<FIELD>`. And text shown to people
(Luigi's failure explanations, `ExternalProgramRunError`) has every known secret value and the
value of every secret-named variable masked. Pure functions; no I/O.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from luigi_creds.agent_client import AGENT_TOKEN_VARIABLE, AgentEndpoint, container_env
from luigi_creds.credentials import AwsCredentials, Credential, VaultSecret, VaultToken

__all__ = [
    "AWS_ENV_VARIABLES",
    "BOOTSTRAP_DIR",
    "PRELOAD_VARIABLE",
    "SECRET_ENV_NAMES",
    "child_env",
    "container_env",
    "redact",
    "scrub_aws_env",
    "secret_values",
    "with_preload",
]

# Variables that, left in a child's environment, win over every other provider or point it at a
# different identity; removed before our own are set.
AWS_ENV_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CREDENTIAL_EXPIRATION",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
)

# Environment variables whose values are secrets wherever they appear.
SECRET_ENV_NAMES = frozenset(
    {
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "VAULT_TOKEN",
        AGENT_TOKEN_VARIABLE,
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
        "BITBUCKET_STEP_OIDC_TOKEN",
    }
)


# The directory `luigi-creds exec` puts first on a command's PYTHONPATH: its sitecustomize
# (bootstrap/sitecustomize.py) imports what Luigi would import in every forked task process
# once, in the job's scheduling process. `LUIGI_CREDS_PRELOAD=0` turns it off.
BOOTSTRAP_DIR = str(Path(__file__).resolve().parent / "bootstrap")
PRELOAD_VARIABLE = "LUIGI_CREDS_PRELOAD"


def with_preload(env: Mapping[str, str], bootstrap: str = BOOTSTRAP_DIR) -> dict[str, str]:
    """`env` with `bootstrap` first on PYTHONPATH (once), unless `LUIGI_CREDS_PRELOAD=0`."""
    out = dict(env)
    if out.get(PRELOAD_VARIABLE) == "0":
        return out
    entries = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != bootstrap]
    out["PYTHONPATH"] = os.pathsep.join([bootstrap, *entries])
    return out


def scrub_aws_env(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of `environ` without any AWS credential-selecting variable."""
    return {k: v for k, v in environ.items() if k not in AWS_ENV_VARIABLES}


def _variable_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", text).upper()


def child_env(
    base: Mapping[str, str],
    creds: Iterable[Credential],
    agent: AgentEndpoint,
    task: str | None,
    *,
    vault_addr: str | None = None,
) -> dict[str, str]:
    """`base` without stray AWS variables, plus what each credential needs; `agent` must be a
    bearer scoped to `task` and these grants (never the job's own)."""
    env = scrub_aws_env(base)
    env.update(agent.env())
    aws_done = False
    for cred in creds:
        if isinstance(cred, AwsCredentials):
            if not aws_done:
                # The child's SDKs refresh through the agent; no AWS secret sits in its env.
                env.update(container_env(agent, cred.grant, task))
                aws_done = True
        elif isinstance(cred, VaultToken):
            env["VAULT_TOKEN"] = cred.token
            if vault_addr:
                env["VAULT_ADDR"] = vault_addr
        else:
            prefix = f"LUIGI_CREDS_{_variable_part(cred.grant)}_"
            for key, value in cred.data.items():
                env[prefix + _variable_part(str(key))] = str(value)
    return env


def secret_values(creds: Iterable[Credential], environ: Mapping[str, str]) -> set[str]:
    """Every secret value in `creds` and in `environ`'s secret-named variables."""
    values: set[str] = set()
    for cred in creds:
        if isinstance(cred, AwsCredentials):
            values |= {cred.secret_access_key, cred.session_token}
        elif isinstance(cred, VaultToken):
            values.add(cred.token)
        elif isinstance(cred, VaultSecret):
            values |= {str(v) for v in cred.data.values()}
    values |= {environ[k] for k in SECRET_ENV_NAMES if environ.get(k)}
    return {v for v in values if len(v) >= 4}


def redact(text: str, secrets: set[str] | frozenset[str] = frozenset()) -> str:
    """Replace known secret values and the values of secret-named variables with `***`."""
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, "***")
    names = "|".join([*sorted(SECRET_ENV_NAMES), r"LUIGI_CREDS_\w+"])
    # ExternalProgramRunError prints NAME='value'; shells and dicts use NAME=value / 'NAME': 'v'.
    text = re.sub(rf"\b({names})='[^']*'", r"\1='***'", text)
    text = re.sub(rf"\b({names})=(?!')\S+", r"\1=***", text)
    return re.sub(rf"'({names})': '[^']*'", r"'\1': '***'", text)
