"""Ending refresh sessions: revoke what they minted and record it.

Owns what happens when a session ends early (client revoke, reuse detected, operator revoke):
every Vault token and dynamic-secret holder minted under it is revoked at Vault; AWS sessions,
which STS cannot revoke, are marked revoked in the audit by AccessKeyId so CloudTrail can be
checked for later use. Talks to the session store, the minters (through GrantMinter) and the
audit store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from broker.audit.events import AuditEvent, Outcome
from broker.audit.store import AuditStore
from broker.mint.grants import REF_AWS, GrantMinter
from broker.sealing import SealError
from broker.sessions import Session, SessionStore
from broker.storage import StoreUnavailable

log = logging.getLogger("broker.revocation")


class SessionEnder:
    def __init__(
        self,
        sessions: SessionStore,
        minter: GrantMinter,
        audit: AuditStore,
        *,
        hash_ref: Callable[[str], str],
        clock: Callable[[], datetime],
    ) -> None:
        self._sessions = sessions
        self._minter = minter
        self._audit = audit
        self._hash_ref = hash_ref
        self._clock = clock

    def end(self, session: Session, *, reason: str, request_id: str) -> bool:
        """Revoke the credentials of an already-revoked session; True when all are handled.

        Failures are logged and recorded, never raised: the session itself is already ended
        in the store, so no new credential can come from it whatever happens here.
        """
        try:
            # Every credential ever recorded, not only those unexpired by the expiry recorded at
            # mint: a client renews its Vault token or lease directly at Vault, so that expiry
            # says nothing about what is still alive. Vault does; GrantMinter.revoke counts a
            # credential that is already gone as revoked.
            refs = self._sessions.credentials(session.id)
        except (StoreUnavailable, SealError):
            # SealError: the references were sealed under another salt file than this broker's.
            log.error("cannot list a revoked session's credentials", extra={"session": session.id})
            refs = []
        aws_marked: list[str] = []
        vault_revoked: list[str] = []
        vault_failed: list[str] = []
        for kind, ref in refs:
            if kind == REF_AWS:
                aws_marked.append(ref)
            elif self._minter.revoke(kind, ref):
                vault_revoked.append(self._hash_ref(ref))
            else:
                vault_failed.append(self._hash_ref(ref))
        event = AuditEvent(
            time=self._clock(),
            request_id=request_id,
            outcome=Outcome.REVOKED,
            reason=reason,
            kind="session",
            issuer=session.issuer,
            subject=session.subject[:256],
            session_id=session.id,
            detail={
                "aws_marked_revoked": aws_marked,
                "vault_revoked": vault_revoked,
                "vault_revoke_failed": vault_failed,
            },
        )
        try:
            self._audit.append(event)
        except StoreUnavailable:
            log.error("session end not audited", extra={"session": session.id})
            return False
        return not vault_failed
