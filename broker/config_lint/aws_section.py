"""AWS: a grant's [grant.aws] table (role, session tags, session policy, partition and region,
all within STS's limits) and the [upstream.aws] table."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from broker.config import (
    AWS_PARTITIONS,
    STS_MAX_TAGS,
    STS_POLICY_MAX,
    STS_TAG_CHARS,
    STS_TAG_KEY_MAX,
    STS_TAG_VALUE_MAX,
    AwsGrant,
    UpstreamAws,
)
from broker.config_lint.reader import CLAIM_NAME, Lint

_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_TAG_KEY = re.compile(f"[{STS_TAG_CHARS}]+")
_REGION = re.compile(r"[a-z]{2}(?:-gov|-iso[a-z]?)?-[a-z]+-\d")
# STS: ExternalId is 2..1224 characters of [\w+=,.@:/-]; the inline Policy at most 2048.
_EXTERNAL_ID = re.compile(r"[\w+=,.@:/-]{2,1224}", re.ASCII)

_AWS_GRANT_KEYS = frozenset(
    {
        "role_arn",
        "session_tags",
        "source_identity",
        "session_name",
        "session_policy",
        "external_id",
        "transitive_tags",
        "region",
        "sts_endpoint",
        "profile",
        "partition",
    }
)

_UPSTREAM_AWS_KEYS = frozenset({"region", "endpoint_url"})


def aws_grant(lint: Lint, t: Mapping[str, Any], w: str) -> AwsGrant:
    lint.keys(t, w, _AWS_GRANT_KEYS)
    role_arn = lint.required_str(t, "role_arn", w)
    if role_arn and not _ROLE_ARN.fullmatch(role_arn):
        lint.add(f"{w}.role_arn", "expected arn:aws:iam::<12 digits>:role/<name>")
    tags_t = lint.table(t.get("session_tags", {}), f"{w}.session_tags") or {}
    tags: dict[str, str] = {}
    if len(tags_t) > STS_MAX_TAGS:
        lint.add(f"{w}.session_tags", f"STS allows at most {STS_MAX_TAGS} session tags")
    for key, value in tags_t.items():
        tw = f"{w}.session_tags.{key}"
        if len(key) > STS_TAG_KEY_MAX or not _TAG_KEY.fullmatch(key):
            lint.add(tw, "tag keys are 1-128 of A-Z a-z 0-9 space _ . : / = + - @")
        elif key.lower().startswith("aws:"):
            lint.add(tw, "the aws: prefix is reserved")
        if not isinstance(value, str):
            lint.add(tw, 'expected a string template such as "{project_path}"')
            continue
        if len(_PLACEHOLDER.sub("", value)) > STS_TAG_VALUE_MAX:
            lint.add(tw, "STS tag values are at most 256 characters")
        _template(lint, value, tw)
        tags[key] = value
    source_identity = _optional_template(lint, t, "source_identity", w)
    session_name = _optional_template(lint, t, "session_name", w)
    transitive = lint.str_list(t, "transitive_tags", w) if "transitive_tags" in t else ()
    for key in transitive:
        if key not in tags:
            lint.add(f"{w}.transitive_tags", f"{key!r} is not one of this grant's session_tags")
    external_id = lint.typed(t, "external_id", w, str, "") or None
    if external_id is not None and not _EXTERNAL_ID.fullmatch(external_id):
        lint.add(f"{w}.external_id", "STS takes 2-1224 characters of A-Z a-z 0-9 +=,.@:/-_")
    grant = AwsGrant(
        role_arn=role_arn,
        session_tags=MappingProxyType(tags),
        source_identity=source_identity,
        session_name=session_name,
        session_policy=_session_policy(lint, t, w),
        external_id=external_id,
        transitive_tags=transitive,
        region=lint.typed(t, "region", w, str, "") or None,
        sts_endpoint=lint.typed(t, "sts_endpoint", w, str, "") or None,
        profile=lint.typed(t, "profile", w, str, "") or None,
    )
    _aws_location(lint, t, grant, w)
    return grant


def _aws_location(lint: Lint, t: Mapping[str, Any], grant: AwsGrant, w: str) -> None:
    """Partition, region and endpoint agree: a role in aws-cn is reached in a cn- region."""
    partition = lint.typed(t, "partition", w, str, "") or grant.partition
    if partition not in AWS_PARTITIONS:
        lint.add(f"{w}.partition", f"expected one of {', '.join(AWS_PARTITIONS)}")
        return
    if grant.role_arn and grant.partition != partition:
        lint.add(f"{w}.role_arn", f"the role's partition is not {partition!r}")
    if grant.region is not None:
        prefix = AWS_PARTITIONS[partition]
        in_partition = [
            p for p, pre in AWS_PARTITIONS.items() if pre and grant.region.startswith(pre)
        ]
        if not _REGION.fullmatch(grant.region):
            lint.add(f"{w}.region", "expected a region name such as eu-west-1")
        elif (in_partition[0] if in_partition else "aws") != partition:
            where = f"a {prefix}* region" if prefix else "a region outside cn- and us-gov-"
            lint.add(f"{w}.region", f"partition {partition} needs {where}")
    elif partition != "aws":
        lint.add(f"{w}.region", f"required for a role in partition {partition}")
    if grant.sts_endpoint is not None:
        lint.url(grant.sts_endpoint, f"{w}.sts_endpoint")


def _session_policy(lint: Lint, t: Mapping[str, Any], w: str) -> str | None:
    """The inline session policy table as canonical JSON; string values may hold claim
    templates. Checked: a Statement, balanced placeholders, STS's 2048-character limit."""
    if "session_policy" not in t:
        return None
    where = f"{w}.session_policy"
    policy = lint.table(t["session_policy"], where)
    if policy is None:
        return None
    if "Statement" not in policy:
        lint.add(where, "an IAM policy needs a Statement")

    def walk(node: object, at: str) -> None:
        if isinstance(node, str):
            _template(lint, node, at)
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{at}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{at}[{i}]")

    walk(policy, where)
    text = json.dumps(policy, separators=(",", ":"), sort_keys=True, default=str)
    # Placeholders count at their rendered size, unknown here: checked again when minting.
    if len(_PLACEHOLDER.sub("", text)) > STS_POLICY_MAX:
        lint.add(
            where, f"STS takes an inline session policy of at most {STS_POLICY_MAX} characters"
        )
    return text


def _optional_template(lint: Lint, t: Mapping[str, Any], key: str, w: str) -> str | None:
    value = lint.typed(t, key, w, str, "")
    if key in t and isinstance(t[key], str):
        _template(lint, value, f"{w}.{key}")
        return value
    return None


def _template(lint: Lint, value: str, where: str) -> None:
    for placeholder in _PLACEHOLDER.findall(value):
        if not CLAIM_NAME.fullmatch(placeholder):
            lint.add(where, f"{{{placeholder}}}: placeholders are {{claim_name}} only")
    if "{" in _PLACEHOLDER.sub("", value) or "}" in _PLACEHOLDER.sub("", value):
        lint.add(where, "unbalanced '{' or '}'; placeholders are {claim_name} only")


def upstream_aws(lint: Lint, t: Mapping[str, Any]) -> UpstreamAws:
    w = "upstream.aws"
    lint.keys(t, w, _UPSTREAM_AWS_KEYS)
    endpoint = lint.typed(t, "endpoint_url", w, str, "") or None
    if endpoint:
        lint.url(endpoint, f"{w}.endpoint_url")
    return UpstreamAws(
        region=lint.typed(t, "region", w, str, UpstreamAws().region), endpoint_url=endpoint
    )
