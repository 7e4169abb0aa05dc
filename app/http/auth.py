"""Authentication and authorisation: bearer JWT (HS256) or, with no secret, local mode.

Tokens carry `sub` (user id), `app_id` and `roles` (`user`, `auditor`, `analyst`). Browsers pass
the token to a WebSocket as the subprotocol `bearer.<token>`, since they cannot set headers there.
Tokens are checked with PyJWT (the library under Litestar's JWT support), whose `Token` model
would demand `iat` and nest custom claims; the contract has `app_id` and `roles` at the top level.
"""

from __future__ import annotations

import time
from typing import Any, Final

import jwt
import msgspec
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from app.settings import Settings

ALGORITHM: Final = "HS256"
SUBPROTOCOL_PREFIX: Final = "bearer."
ROLES: Final = frozenset({"user", "auditor", "analyst"})


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who is calling: a user of an app with some roles."""

    user_id: str
    app_id: str
    roles: frozenset[str]

    def can_read_chat(self, owner: str, app_id: str) -> bool:
        """Users read their own chats; auditors read every chat of their app."""
        return (owner == self.user_id and app_id == self.app_id) or (
            "auditor" in self.roles and app_id == self.app_id
        )

    def can_control_chat(self, owner: str, app_id: str) -> bool:
        """Only the chat's own user may continue or stop it."""
        return owner == self.user_id and app_id == self.app_id


LOCAL_USER: Final = Principal(user_id="local", app_id="local", roles=ROLES)


def issue_token(secret: str, user_id: str, app_id: str, roles: list[str], ttl_s: int = 3600) -> str:
    """A signed token for `user_id` with top-level `app_id` and `roles` claims (`mozaiks token`)."""
    issued = int(time.time())
    claims = {"sub": user_id, "app_id": app_id, "roles": roles, "iat": issued, "exp": issued + ttl_s}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def token_from(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The bearer token of a request: `Authorization: Bearer …`, or a `bearer.…` WebSocket subprotocol."""
    header = connection.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    protocols = connection.scope.get("subprotocols") or ()
    for protocol in protocols if isinstance(protocols, (list, tuple)) else ():
        if isinstance(protocol, str) and protocol.startswith(SUBPROTOCOL_PREFIX):
            return protocol[len(SUBPROTOCOL_PREFIX) :]
    return None


def principal_from_token(encoded: str, secret: str) -> Principal:
    """Decode and check a token (HS256, `sub` required, `exp` checked when present).

    Raises NotAuthorizedException naming what is wrong.
    """
    try:
        claims = jwt.decode(encoded, secret, algorithms=[ALGORITHM], options={"require": ["sub"]})
    except jwt.PyJWTError as exc:
        raise NotAuthorizedException(f"invalid token: {exc}") from None
    app_id = claims.get("app_id")
    roles = claims.get("roles", ["user"])
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise NotAuthorizedException("invalid token: claim sub must be a non-empty string")
    if not isinstance(app_id, str) or not app_id:
        raise NotAuthorizedException("invalid token: claim app_id is missing")
    if not isinstance(roles, list) or not set(roles) <= ROLES:
        raise NotAuthorizedException(f"invalid token: roles must be a list of {sorted(ROLES)}")
    return Principal(user_id=subject, app_id=app_id, roles=frozenset(roles))


class BearerAuthMiddleware(AbstractAuthenticationMiddleware):
    """Attach the caller's Principal to every request and WebSocket (local user in local mode)."""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        settings: Settings = connection.app.state.settings
        if settings.auth_secret is None:
            return AuthenticationResult(user=LOCAL_USER, auth=None)
        encoded = token_from(connection)
        if encoded is None:
            raise NotAuthorizedException(
                "missing bearer token (Authorization header or bearer.<token> subprotocol)"
            )
        return AuthenticationResult(user=principal_from_token(encoded, settings.auth_secret), auth=encoded)


def require_role(connection: ASGIConnection[Any, Any, Any, Any], role: str) -> Principal:
    """The caller, if it has `role`; else 403."""
    principal: Principal = connection.user
    if role not in principal.roles:
        raise PermissionDeniedException(f"this needs the {role!r} role")
    return principal
