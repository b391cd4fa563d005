"""`[luigi_creds]` as Luigi reads it: a `luigi.Config`, so the section behaves like any other.

Owns the binding of the settings (settings.py, pure) to Luigi's configuration: config files found
the way Luigi finds them, command-line overrides (`--luigi-creds-aws-grant etl-writer`) and the
section's entry in `--help-all`, which Luigi offers for every config class imported before it
reads its command line (a module given with `--module` that imports luigi_creds, or any job
using `CredentialsMixin`). Every parameter is a plain string so that validation stays in
`ClientSettings.from_mapping`, which lists every problem at once.
"""

from __future__ import annotations

from typing import Any

import luigi
import luigi.configuration

from luigi_creds.settings import (
    DEFAULT_GITLAB_VARIABLE,
    FAMILY_SECTION_PREFIX,
    SECTION,
    ClientSettings,
    ConfigError,
)

__all__ = ["LuigiCredsConfig", "from_luigi_config"]


class LuigiCredsConfig(luigi.Config):
    """luigi-creds: short-lived AWS and Vault credentials from the broker."""

    # Plain strings, one per ClientSettings.KEYS entry; validated together by ClientSettings.
    broker_url = luigi.Parameter(
        default="", description="The broker's URL (https unless on loopback)."
    )
    token_source = luigi.Parameter(
        default="",
        description="Where the job's identity comes from: env:VAR, file:PATH, gitlab, github, "
        "bitbucket or okta.",
    )
    ca_bundle = luigi.Parameter(
        default="", description="A PEM file of CA certificates for the broker's TLS."
    )
    audience = luigi.Parameter(
        default="", description="What the github source requests (default: broker_url)."
    )
    gitlab_variable = luigi.Parameter(
        default="", description=f"The GitLab id_token variable (default {DEFAULT_GITLAB_VARIABLE})."
    )
    vault_addr = luigi.Parameter(
        default="", description="Vault's address, set as VAULT_ADDR in tasks."
    )
    timeout = luigi.Parameter(default="", description="Seconds per broker request (default 10).")
    refresh_chains = luigi.Parameter(
        default="",
        description="Mints the job's session makes at once (default 4; up to the broker's "
        "session_max_chains): set it to the job's worker count if that is higher.",
    )
    okta_token_endpoint = luigi.Parameter(
        default="", description="Okta authorization server token endpoint."
    )
    okta_client_id = luigi.Parameter(default="", description="Okta service app client id.")
    okta_private_key_file = luigi.Parameter(
        default="", description="The service app's private key (PEM) for private_key_jwt."
    )
    okta_scopes = luigi.Parameter(
        default="", description="Space-separated scopes to request from Okta."
    )
    okta_key_id = luigi.Parameter(
        default="", description="The kid of the service app's key in Okta."
    )
    aws_grant = luigi.Parameter(
        default="",
        description="The grant whose AWS credentials every task's process gets "
        "(TaskCredentials); [luigi_creds:<TaskFamily>] overrides it per family.",
    )
    vault_grant = luigi.Parameter(
        default="",
        description="The grant whose Vault token every task's process gets as VAULT_TOKEN "
        "(TaskCredentials); [luigi_creds:<TaskFamily>] overrides it per family.",
    )

    @classmethod
    def get_task_family(cls) -> str:
        return SECTION


# The section's parameters, listed once with the module (Luigi lists a class's parameters with
# dir() and getattr on every call): a forked task process finds them listed already.
_PARAMS: tuple[tuple[str, Any], ...] = tuple(LuigiCredsConfig.get_params())  # type: ignore[no-untyped-call]


def from_luigi_config() -> ClientSettings:
    """`[luigi_creds]` as Luigi resolves it (config files, then command-line overrides), with
    the `[luigi_creds:<TaskFamily>]` sections; every problem at once in a ConfigError."""
    config = luigi.configuration.get_config()  # type: ignore[no-untyped-call]
    raw: dict[str, str] = {}
    # Each parameter's value as an instance would get it (command line, then config, then
    # default), without instantiating the Config: a task's process reads the settings once,
    # and a first instantiation there costs about 3 ms of CPU against 0.5 for this.
    for key, param in _PARAMS:
        value = str(param.task_value(SECTION, key))
        if value and key in ClientSettings.KEYS:
            raw[key] = value
    has_section = config.has_section(SECTION)
    if has_section:
        for key, value in config.items(SECTION):
            if key.replace("-", "_") not in ClientSettings.KEYS:
                raw[key] = str(value)
    if not has_section and not raw:
        raise ConfigError(f"luigi config has no [{SECTION}] section (nor --luigi-creds-* options)")
    families = {
        section[len(FAMILY_SECTION_PREFIX) :]: dict(config.items(section))
        for section in config.sections()
        if section.startswith(FAMILY_SECTION_PREFIX)
    }
    return ClientSettings.from_mapping(raw, families)
