"""Authentication and authorisation: bearer JWTs of an OIDC provider (RS/PS/ES, checked against its
JWKS), HS256 tokens signed with the development secret, or, with neither, local mode.

HS256 tokens carry `sub` (user id), `app_id` and `roles` (`user`, `auditor`, `analyst`); an OIDC
provider's claims map to the same principal through MOZAIKS_CLAIM_USER/APP/ROLES. Browsers pass
the token to a WebSocket as the subprotocol `bearer.<token>`, since they cannot set headers there.
Tokens are checked with PyJWT (the library under Litestar's JWT support), whose `Token` model
would demand `iat` and nest custom claims; the contract has `app_id` and `roles` at the top level.
Every refusal is a 401 whose code says why (`app.http.codes`); the token itself is never logged.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import jwt
import msgspec
import structlog
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from app.http import codes
from app.settings import Settings

ALGORITHM: Final = "HS256"
# Asymmetric algorithms only: `none` and HMAC (whose "secret" would be the provider's public key) never.
OIDC_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
_KEY_TYPE: Final = {"RS": "RSA", "PS": "RSA", "ES": "EC"}
JWKS_TIMEOUT_S: Final = 5.0
JWKS_LIFESPAN_S: Final = 300.0  # a fetched key set is used this long before it is fetched again
PROVIDER_RETRY_S: Final = 5.0  # after the provider failed to answer, its tokens get 503 at once this long
_T = TypeVar("_T")
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


log = structlog.get_logger("mozaiks.auth")
LOCAL_USER: Final = Principal(user_id="local", app_id="local", roles=ROLES)


class TokenRefused(NotAuthorizedException):
    """A 401 whose `code` (app.http.codes) says why the token was refused."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class IdentityUnavailable(Exception):
    """The identity provider's keys cannot be fetched (503 `identity_unavailable`, not the token's fault)."""


# PyJWT's error → our code (the first that matches; subclasses before their bases).
_REFUSALS: Final[tuple[tuple[type[jwt.PyJWTError], str], ...]] = (
    (jwt.ExpiredSignatureError, codes.TOKEN_EXPIRED),
    (jwt.ImmatureSignatureError, codes.TOKEN_NOT_YET_VALID),
    (jwt.InvalidAudienceError, codes.WRONG_AUDIENCE),
    (jwt.InvalidIssuerError, codes.WRONG_ISSUER),
    (jwt.InvalidSignatureError, codes.BAD_SIGNATURE),
    (jwt.InvalidAlgorithmError, codes.ALGORITHM_NOT_ALLOWED),
    (jwt.InvalidKeyError, codes.ALGORITHM_NOT_ALLOWED),
)


def _refusal(exc: jwt.PyJWTError) -> TokenRefused:
    code = next((code for kind, code in _REFUSALS if isinstance(exc, kind)), codes.UNAUTHORIZED)
    return TokenRefused(code, f"invalid token: {exc}")


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

    Raises TokenRefused naming what is wrong.
    """
    try:
        claims = jwt.decode(encoded, secret, algorithms=[ALGORITHM], options={"require": ["sub"]})
    except jwt.PyJWTError as exc:
        raise _refusal(exc) from None
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


def claim(claims: Mapping[str, Any], path: str) -> Any:
    """The claim named `path` (`https://acme.example/roles` too), else the one dots step into objects
    to (`realm_access.roles`); None when absent."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def mapped_principal(claims: Mapping[str, Any], settings: Settings) -> Principal:
    """The principal of an identity provider's claims, through MOZAIKS_CLAIM_USER/APP/ROLES.

    Every authenticated caller is a `user`; `auditor` and `analyst` come from the roles claim (a list,
    or a space-separated string), whose other roles are ignored.
    """
    found: dict[str, str] = {}
    for name, path in (
        ("MOZAIKS_CLAIM_USER", settings.claim_user),
        ("MOZAIKS_CLAIM_APP", settings.claim_app),
    ):
        value = claim(claims, path)
        if not isinstance(value, str) or not value:
            raise TokenRefused(
                codes.UNAUTHORIZED, f"invalid token: claim {path} ({name}) must be a non-empty string"
            )
        found[name] = value
    roles = claim(claims, settings.claim_roles)
    if isinstance(roles, str):
        roles = roles.split()
    if roles is not None and not isinstance(roles, list):
        raise TokenRefused(
            codes.UNAUTHORIZED,
            f"invalid token: claim {settings.claim_roles} (MOZAIKS_CLAIM_ROLES) must be a list",
        )
    granted = {"user"} | ({role for role in roles or () if isinstance(role, str)} & ROLES)
    return Principal(
        user_id=found["MOZAIKS_CLAIM_USER"], app_id=found["MOZAIKS_CLAIM_APP"], roles=frozenset(granted)
    )


class TokenVerifier:
    """Checks bearer tokens: HS256 against the secret, RS/PS/ES against the OIDC provider's JWKS.

    Keys come from PyJWT's `PyJWKClient` (key set cached JWKS_LIFESPAN_S; an unknown `kid` fetches
    it again at most every MOZAIKS_JWKS_REFRESH_S). The client's HTTP is blocking: a key found in
    the cached set is used on the loop, a fetch runs on the runtime's threads (`asyncio.to_thread`,
    never the model-call pool; see app.runs.pool).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: jwt.PyJWKClient | None = None
        self._client_lock = threading.Lock()
        self.problem: str | None = None  # why the last fetch of the keys failed (None: it did not)
        self._retry_at = 0.0

    async def principal(self, encoded: str) -> Principal:
        """The caller a token names, or TokenRefused (401, code says why) / IdentityUnavailable."""
        settings = self.settings
        try:
            header = jwt.get_unverified_header(encoded)
        except jwt.PyJWTError as exc:
            raise _refusal(exc) from None
        alg = header.get("alg")
        if settings.auth_secret and (not settings.oidc_issuer or alg == ALGORITHM):
            return principal_from_token(encoded, settings.auth_secret)
        if alg not in OIDC_ALGORITHMS:
            raise TokenRefused(
                codes.ALGORITHM_NOT_ALLOWED,
                f"invalid token: algorithm {alg!r} is not allowed (allowed: {', '.join(OIDC_ALGORITHMS)})",
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRefused(codes.UNKNOWN_KEY, "invalid token: no kid header names the signing key")
        key = self._cached_key(kid) or await self._fetched_key(kid)
        if key.key_type != _KEY_TYPE[alg[:2]]:
            raise TokenRefused(
                codes.ALGORITHM_NOT_ALLOWED,
                f"invalid token: {alg} does not go with key {kid} ({key.key_type})",
            )
        try:
            claims = jwt.decode(
                encoded,
                key.key,
                algorithms=[alg],
                audience=settings.oidc_audience,
                issuer=settings.oidc_issuer,
                leeway=settings.oidc_leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise _refusal(exc) from None
        return mapped_principal(claims, settings)

    def _cached_key(self, kid: str) -> jwt.PyJWK | None:
        cache = self._client.jwk_set_cache if self._client is not None else None
        keys = cache.get() if cache is not None else None
        return next((key for key in keys.keys if key.key_id == kid), None) if keys is not None else None

    async def _fetched_key(self, kid: str) -> jwt.PyJWK:
        try:
            return await self._ask_provider(lambda client: client.get_signing_key(kid))
        except jwt.PyJWKClientError as exc:
            raise TokenRefused(codes.UNKNOWN_KEY, f"invalid token: {exc}") from None

    async def _ask_provider(self, call: Callable[[jwt.PyJWKClient], _T]) -> _T:
        """`call` with the JWKS client, on a runtime thread. After the provider failed to answer, fail
        fast for PROVIDER_RETRY_S: requests must not pile up on threads behind a provider that is down."""
        if self.problem is not None and time.monotonic() < self._retry_at:
            raise IdentityUnavailable(self.problem)
        try:
            found = await asyncio.to_thread(lambda: call(self._jwks()))
        except jwt.PyJWKClientConnectionError as exc:
            raise self._down(exc) from None
        except jwt.PyJWKClientError:
            raise  # the set came, without the key asked for
        except jwt.PyJWTError as exc:  # a key set that does not parse
            raise self._down(exc) from None
        self.problem = None
        return found

    def _down(self, exc: Exception) -> IdentityUnavailable:
        self.problem = f"cannot fetch the identity provider's keys: {exc}"
        self._retry_at = time.monotonic() + PROVIDER_RETRY_S
        log.warning("identity.keys_unavailable", error=str(exc))
        return IdentityUnavailable(self.problem)

    def _jwks(self) -> jwt.PyJWKClient:
        """The JWKS client (blocking: call off the loop), discovering its URL from the issuer if needed."""
        with self._client_lock:
            if self._client is None:
                self._client = jwt.PyJWKClient(
                    self.settings.jwks_url or self._discover(),
                    lifespan=JWKS_LIFESPAN_S,
                    timeout=JWKS_TIMEOUT_S,
                    cooldown_duration=self.settings.jwks_refresh_s,
                )
            return self._client

    def _discover(self) -> str:
        issuer = str(self.settings.oidc_issuer).rstrip("/")
        url = f"{issuer}/.well-known/openid-configuration"
        try:
            with urllib.request.urlopen(url, timeout=JWKS_TIMEOUT_S) as response:
                document = json.load(response)
        except (OSError, ValueError) as exc:
            raise jwt.PyJWKClientConnectionError(f"discovery at {url} failed: {exc}") from None
        jwks_uri = document.get("jwks_uri") if isinstance(document, dict) else None
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("http://", "https://")):
            raise jwt.PyJWKClientConnectionError(f"discovery at {url} names no http(s) jwks_uri")
        return jwks_uri

    async def ready(self) -> str:
        """`ok` when the provider's keys are at hand (fetching them if need be), `off` without OIDC, else why not."""
        if not self.settings.oidc_issuer:
            return "off"
        try:
            await self._ask_provider(lambda client: client.get_signing_keys())
        except (IdentityUnavailable, jwt.PyJWKClientError) as exc:
            return f"error: {exc}"
        return "ok"


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any], missing: str) -> Principal:
    """The caller of a request or socket: the local user in local mode, else its token's principal.

    `missing`: the refusal's detail when there is no token at all.
    """
    settings: Settings = connection.app.state.settings
    if settings.local_mode:
        return LOCAL_USER
    encoded = token_from(connection)
    if encoded is None:
        raise NotAuthorizedException(missing)
    verifier: TokenVerifier = connection.app.state.verifier
    return await verifier.principal(encoded)


class BearerAuthMiddleware(AbstractAuthenticationMiddleware):
    """Attach the caller's Principal to every request and WebSocket (local user in local mode)."""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        missing = "missing bearer token (Authorization header or bearer.<token> subprotocol)"
        return AuthenticationResult(user=await authenticate(connection, missing), auth=token_from(connection))


def require_role(connection: ASGIConnection[Any, Any, Any, Any], role: str) -> Principal:
    """The caller, if it has `role`; else 403."""
    principal: Principal = connection.user
    if role not in principal.roles:
        raise PermissionDeniedException(f"this needs the {role!r} role")
    return principal
