"""The OpenAPI description served at /openapi.json: the wire protocol of docs/protocol.md, by
hand.

Kept by hand rather than generated so that it states the contract (RFC 8693 form fields, RFC 6749
error bodies) instead of whatever a framework infers. A contract test checks it against the app.
"""

from __future__ import annotations

from typing import Any

from broker.protocol import (
    GRANT_TYPE_REFRESH,
    GRANT_TYPE_TOKEN_EXCHANGE,
    REVOKE_HINT_LEASE,
    REVOKE_HINT_REFRESH,
    SUBJECT_TOKEN_TYPES,
    TOKEN_TYPE_DPOP,
    TOKEN_TYPE_NOT_APPLICABLE,
)

_ERROR = {
    "type": "object",
    "required": ["error", "error_description", "request_id"],
    "properties": {
        "error": {
            "type": "string",
            "enum": [
                "invalid_request",
                "invalid_grant",
                "invalid_target",
                "unsupported_grant_type",
                "temporarily_unavailable",
                "invalid_dpop_proof",
                "use_dpop_nonce",
            ],
        },
        "error_description": {"type": "string"},
        "request_id": {"type": "string"},
    },
}


# RFC 9449: a proof of possession of the key a session is bound to (see docs/protocol.md).
_DPOP_HEADER = {
    "name": "DPoP",
    "in": "header",
    "required": False,
    "description": "DPoP proof JWT (RFC 9449); required on a session bound to a key",
    "schema": {"type": "string"},
}


def _error_response(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry_after:
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return response


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "luigi-creds broker",
        "version": "1",
        "description": "RFC 8693 token exchange: OIDC in, short-lived AWS/Vault credentials out.",
    },
    "paths": {
        "/v1/token": {
            "post": {
                "parameters": [_DPOP_HEADER],
                "summary": "Exchange a subject token (or a refresh handle) for a credential",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": {
                                "type": "object",
                                "required": ["grant_type"],
                                "properties": {
                                    "grant_type": {
                                        "type": "string",
                                        "enum": [GRANT_TYPE_TOKEN_EXCHANGE, GRANT_TYPE_REFRESH],
                                    },
                                    "subject_token": {"type": "string", "maxLength": 8192},
                                    "subject_token_type": {
                                        "type": "string",
                                        "enum": list(SUBJECT_TOKEN_TYPES),
                                    },
                                    "audience": {"type": "string", "description": "grant name"},
                                    "requested_token_type": {"type": "string"},
                                    "duration": {"type": "string", "pattern": "^[0-9]{1,6}$"},
                                    "task": {"type": "string", "maxLength": 512},
                                    "refresh_token": {"type": "string"},
                                    "sibling_chains": {
                                        "type": "string",
                                        "pattern": "^[0-9]{1,3}$",
                                        "description": "refresh only: sibling refresh chains "
                                        "to open (at most [broker] session_max_chains in all)",
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "Issued",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Issued"}}
                        },
                    },
                    "400": _error_response("Rejected request, token, grant or refresh handle"),
                    "413": _error_response("Body too large"),
                    "429": _error_response("Rate limited", retry_after=True),
                    "503": _error_response("Upstream or audit store unavailable", retry_after=True),
                },
            }
        },
        "/v1/revoke": {
            "post": {
                "parameters": [_DPOP_HEADER],
                "summary": "End a refresh session (RFC 7009), or revoke one Vault lease it minted",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": {
                                "type": "object",
                                "required": ["token"],
                                "properties": {
                                    "token": {
                                        "type": "string",
                                        "description": "refresh handle, or a lease_id",
                                    },
                                    "token_type_hint": {
                                        "type": "string",
                                        "enum": [REVOKE_HINT_REFRESH, REVOKE_HINT_LEASE],
                                    },
                                    "refresh_token": {
                                        "type": "string",
                                        "description": "with a lease: the session's handle",
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": {"description": "Revoked, or nothing to revoke (RFC 7009 §2.2)"},
                    "400": _error_response("Malformed request, or a lease of another session"),
                    "503": _error_response("Audit store or Vault unavailable", retry_after=True),
                },
            }
        },
        "/v1/explain": {
            "post": {
                "parameters": [_DPOP_HEADER],
                "summary": "Who a token or session is, and which grants it may use (no jti spent)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "subject_token": {"type": "string", "maxLength": 8192},
                                    "subject_token_type": {"type": "string"},
                                    "refresh_token": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "issuer, subject, allowed grants, session if any",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "400": _error_response("Bad token or refresh handle"),
                    "429": _error_response("Rate limited", retry_after=True),
                    "503": _error_response("Issuer keys or audit store unavailable", True),
                },
            }
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "OK"}}}},
        "/readyz": {
            "get": {
                "summary": "Readiness: issuer keys, audit store, upstreams",
                "responses": {
                    "200": {"description": "Ready"},
                    "503": {"description": "Not ready"},
                },
            }
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "OK"}}}
        },
    },
    "components": {
        "schemas": {
            "Error": _ERROR,
            "Issued": {
                "type": "object",
                "required": [
                    "access_token",
                    "issued_token_type",
                    "token_type",
                    "expires_in",
                    "request_id",
                    "credentials",
                ],
                "properties": {
                    "access_token": {"type": "string"},
                    "issued_token_type": {"type": "string"},
                    "token_type": {
                        "type": "string",
                        "enum": [TOKEN_TYPE_NOT_APPLICABLE, TOKEN_TYPE_DPOP],
                    },
                    "expires_in": {"type": "integer"},
                    "refresh_token": {"type": "string"},
                    "sibling_refresh_tokens": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "the first handle of each sibling chain asked for",
                    },
                    "request_id": {"type": "string"},
                    "credentials": {"type": "object"},
                },
            },
        }
    },
}
