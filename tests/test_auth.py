"""Tokens and who may do what, without a server: what a token must carry, where it is read from, each refusal named."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException

from app.http.auth import LOCAL_USER, Principal, issue_token, principal_from_token, require_role, token_from

SECRET = "test-secret-of-at-least-thirty-two-bytes!"


def connection(
    headers: dict[str, str] | None = None, subprotocols: list[str] | None = None, user: Any = None
) -> Any:
    scope: dict[str, Any] = {
        "type": "websocket" if subprotocols is not None else "http",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "subprotocols": subprotocols,
        "user": user,
    }
    return ASGIConnection(scope=scope)  # type: ignore[arg-type]


def signed(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def test_an_issued_token_is_hs256_with_top_level_claims_and_a_lifetime() -> None:
    token = issue_token(SECRET, "ann", "shop", ["user", "analyst"], ttl_s=120)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert {k: claims[k] for k in ("sub", "app_id", "roles")} == {
        "sub": "ann",
        "app_id": "shop",
        "roles": ["user", "analyst"],
    }
    assert claims["exp"] - claims["iat"] == 120
    one_hour = jwt.decode(issue_token(SECRET, "ann", "shop", ["user"]), SECRET, algorithms=["HS256"])
    assert one_hour["exp"] - one_hour["iat"] == 3600  # the default lifetime
    assert principal_from_token(token, SECRET) == Principal(
        user_id="ann", app_id="shop", roles=frozenset({"user", "analyst"})
    )


def test_an_expired_token_is_refused() -> None:
    with pytest.raises(NotAuthorizedException, match="invalid token: Signature has expired"):
        principal_from_token(issue_token(SECRET, "ann", "shop", ["user"], ttl_s=-10), SECRET)


@pytest.mark.parametrize(
    ("claims", "problem"),
    [
        ({"app_id": "shop"}, 'invalid token: Token is missing the "sub" claim'),
        ({"sub": "", "app_id": "shop"}, "invalid token: claim sub must be a non-empty string"),
        ({"sub": 7, "app_id": "shop"}, "invalid token: Subject must be a string"),
        ({"sub": "ann"}, "invalid token: claim app_id is missing"),
        ({"sub": "ann", "app_id": ""}, "invalid token: claim app_id is missing"),
        ({"sub": "ann", "app_id": "shop", "roles": "user"}, "invalid token: roles must be a list of"),
        ({"sub": "ann", "app_id": "shop", "roles": ["root"]}, "invalid token: roles must be a list of"),
    ],
)
def test_a_token_missing_or_mangling_a_claim_is_refused_naming_it(
    claims: dict[str, Any], problem: str
) -> None:
    with pytest.raises(NotAuthorizedException) as refused:
        principal_from_token(signed(claims), SECRET)
    assert refused.value.detail.startswith(problem)


def test_a_token_signed_otherwise_is_refused() -> None:
    with pytest.raises(NotAuthorizedException, match="invalid token: Signature verification failed"):
        principal_from_token(
            signed({"sub": "ann", "app_id": "shop"}, "another-secret-of-at-least-32-bytes!!"), SECRET
        )
    with pytest.raises(NotAuthorizedException, match="invalid token: The specified alg value is not allowed"):
        principal_from_token(signed({"sub": "ann", "app_id": "shop"}, SECRET * 2, "HS512"), SECRET)


def test_roles_default_to_user_and_may_be_all_three() -> None:
    assert principal_from_token(signed({"sub": "ann", "app_id": "shop"}), SECRET).roles == {"user"}
    everything = signed({"sub": "ann", "app_id": "shop", "roles": ["user", "auditor", "analyst"]})
    assert principal_from_token(everything, SECRET).roles == {"user", "auditor", "analyst"}


def test_the_token_comes_from_a_bearer_header_or_a_bearer_subprotocol_only() -> None:
    assert token_from(connection({"Authorization": "Bearer abc.def"})) == "abc.def"
    assert token_from(connection({"Authorization": "bearer   abc.def  "})) == "abc.def"
    assert token_from(connection({"Authorization": "Basic abc.def"})) is None
    assert token_from(connection({"Authorization": "Bearer "})) is None
    assert token_from(connection({"Authorization": "abc.def"})) is None
    assert token_from(connection()) is None
    assert token_from(connection(subprotocols=["mozaiks.v1", "bearer.abc.def"])) == "abc.def"
    assert token_from(connection(subprotocols=["mozaiks.v1"])) is None
    # The header wins over the subprotocol.
    assert token_from(connection({"Authorization": "Bearer one"}, ["bearer.two"])) == "one"


def test_who_may_read_and_who_may_control_a_chat() -> None:
    ann = Principal(user_id="ann", app_id="shop", roles=frozenset({"user"}))
    auditor = Principal(user_id="aud", app_id="shop", roles=frozenset({"auditor"}))
    assert ann.can_read_chat("ann", "shop") and ann.can_control_chat("ann", "shop")
    assert not ann.can_read_chat("bob", "shop") and not ann.can_control_chat("bob", "shop")
    assert not ann.can_read_chat("ann", "other") and not ann.can_control_chat("ann", "other")
    assert auditor.can_read_chat("bob", "shop") and not auditor.can_control_chat("bob", "shop")
    assert not auditor.can_read_chat("bob", "other")
    assert auditor.can_read_chat("aud", "shop") and auditor.can_control_chat("aud", "shop")
    assert LOCAL_USER.can_control_chat("local", "local") and LOCAL_USER.roles == {
        "user",
        "auditor",
        "analyst",
    }


def test_require_role_names_the_role_it_needs() -> None:
    analyst = Principal(user_id="a", app_id="shop", roles=frozenset({"analyst"}))
    assert require_role(connection(user=analyst), "analyst") is analyst
    with pytest.raises(PermissionDeniedException) as refused:
        require_role(connection(user=analyst), "auditor")
    assert refused.value.detail == "this needs the 'auditor' role"
