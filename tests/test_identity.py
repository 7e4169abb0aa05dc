"""OIDC tokens against a local identity provider (test-made RSA and EC keys served as a JWKS on 127.0.0.1):
valid ones pass on REST, the WebSocket and AG-UI, each bad one is refused with the code that says why,
a rotated key is picked up without a restart, and a provider down at start-up shows in /health/ready."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app.embedded import free_port
from app.http.auth import Principal, TokenRefused, TokenVerifier
from app.settings import Settings
from tests.nodes import QuietHandler, http_server
from tests.test_agui import body, read_sse

AUDIENCE = "mozaiks-runtime"


class Provider:
    """An OIDC provider's public side: discovery and a JWKS whose keys a test may rotate; counts JWKS fetches."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}  # kid -> private key
        self.published: list[str] = []
        self.fetches = 0
        provider = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    document: dict[str, Any] = {
                        "issuer": provider.issuer,
                        "jwks_uri": f"{provider.issuer}/jwks",
                    }
                elif self.path == "/jwks":
                    provider.fetches += 1
                    document = {"keys": [provider.jwk(kid) for kid in provider.published]}
                else:
                    self.send_error(404)
                    return
                self.reply(json.dumps(document).encode(), "application/json")

        self.handler = Handler
        self.issuer = ""  # once served

    def add(self, kid: str, key: Any, *, publish: bool = True) -> None:
        self.keys[kid] = key
        if publish:
            self.published.append(kid)

    def jwk(self, kid: str) -> dict[str, Any]:
        key = self.keys[kid]
        if isinstance(key, rsa.RSAPrivateKey):
            found = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            found["alg"] = "PS256" if kid.startswith("ps") else "RS256"
        else:
            found = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            found["alg"] = "ES256"
        return {**found, "kid": kid, "use": "sig"}

    def token(self, kid: str = "rsa1", alg: str = "RS256", **claims: Any) -> str:
        now = int(time.time())
        body = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "ann",
            "azp": "shop",
            "realm_access": {"roles": ["analyst", "offline_access"]},
            "iat": now,
            "exp": now + 300,
            **claims,
        }
        return jwt.encode(body, self.keys[kid], algorithm=alg, headers={"kid": kid})

    def public_pem(self, kid: str) -> bytes:
        return bytes(
            self.keys[kid]
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    def settings(self, **overrides: Any) -> Settings:
        fields = {"oidc_audience": AUDIENCE, "claim_app": "azp", "claim_roles": "realm_access.roles"}
        return Settings(oidc_issuer=self.issuer, **{**fields, **overrides})


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    idp = Provider()
    idp.add("rsa1", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    idp.add("ps1", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    idp.add("ec1", ec.generate_private_key(ec.SECP256R1()))
    idp.add("stranger", rsa.generate_private_key(public_exponent=65537, key_size=2048), publish=False)
    with http_server(idp.handler) as url:
        idp.issuer = url
        yield idp


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A token PyJWT would refuse to make: `alg: none`, or HS256 keyed with a public key (algorithm confusion)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest() if key else b""
    return f"{signing_input}.{_b64(signature)}"


def tampered(token: str) -> str:
    head, claims, signature = token.split(".")
    return f"{head}.{claims}.{signature[:-6]}{'AAAAAA' if signature[-6:] != 'AAAAAA' else 'BBBBBB'}"


def bad_tokens(idp: Provider) -> dict[str, tuple[str, str]]:
    """Each refusal the issue names: the token, and the code it must get."""
    claims = jwt.decode(idp.token(), options={"verify_signature": False})
    now = int(time.time())
    return {
        "expired": (idp.token(exp=now - 600), "token_expired"),
        "not yet valid": (idp.token(nbf=now + 600), "token_not_yet_valid"),
        "wrong issuer": (idp.token(iss="https://evil.example.com"), "wrong_issuer"),
        "wrong audience": (idp.token(aud="another-client"), "wrong_audience"),
        "unknown kid": (idp.token(kid="stranger"), "unknown_key"),
        "tampered signature": (tampered(idp.token()), "bad_signature"),
        "signed by another key under a known kid": (
            jwt.encode(claims, idp.keys["stranger"], algorithm="RS256", headers={"kid": "rsa1"}),
            "bad_signature",
        ),
        "alg none": (
            forged({"alg": "none", "typ": "JWT", "kid": "rsa1"}, claims, None),
            "algorithm_not_allowed",
        ),
        "HS256 keyed with the public key": (
            forged({"alg": "HS256", "typ": "JWT", "kid": "rsa1"}, claims, idp.public_pem("rsa1")),
            "algorithm_not_allowed",
        ),
        "RS256 claimed for an EC key": (
            forged({"alg": "RS256", "typ": "JWT", "kid": "ec1"}, claims, b"x"),
            "algorithm_not_allowed",
        ),
        "not a token": ("nope", "unauthorized"),
        "no app claim": (idp.token(azp=None), "unauthorized"),
    }


async def test_tokens_of_the_provider_map_to_principals_and_each_bad_one_gets_its_code(
    provider: Provider,
) -> None:
    verifier = TokenVerifier(provider.settings())
    assert await verifier.ready() == "ok"  # discovered from the issuer, keys fetched
    analyst = Principal(user_id="ann", app_id="shop", roles=frozenset({"user", "analyst"}))
    for kid, alg in (("rsa1", "RS256"), ("ps1", "PS256"), ("ec1", "ES256")):
        assert await verifier.principal(provider.token(kid, alg)) == analyst, alg
    # A claim is found by its whole name (namespaced, as Auth0 makes them) before dots step into objects.
    namespaced = TokenVerifier(provider.settings(claim_roles="https://acme.example/roles"))
    auditor = await namespaced.principal(provider.token(**{"https://acme.example/roles": "auditor admin"}))
    assert auditor.roles == {"user", "auditor"}
    # A little clock skew is fine (MOZAIKS_OIDC_LEEWAY_S, 30 s by default).
    assert await verifier.principal(provider.token(exp=int(time.time()) - 5)) == analyst
    for case, (token, code) in bad_tokens(provider).items():
        with pytest.raises(TokenRefused) as refused:
            await verifier.principal(token)
        assert refused.value.code == code, (case, refused.value.detail)
        assert refused.value.status_code == 401 and token not in str(refused.value.detail), case


async def test_a_rotated_key_is_fetched_for_its_new_kid_at_most_once_per_refresh_interval(
    provider: Provider,
) -> None:
    patient = TokenVerifier(provider.settings())  # MOZAIKS_JWKS_REFRESH_S: 60 by default
    eager = TokenVerifier(provider.settings(jwks_refresh_s=0))
    assert (await patient.ready(), await eager.ready()) == ("ok", "ok")
    provider.add("rsa2", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    try:
        rotated = provider.token("rsa2")
        fetches = provider.fetches
        with pytest.raises(TokenRefused) as refused:  # inside the refresh interval: no second fetch
            await patient.principal(rotated)
        assert (refused.value.code, provider.fetches) == ("unknown_key", fetches)
        assert (await eager.principal(rotated)).user_id == "ann"  # fetched again, no restart
        assert provider.fetches == fetches + 1
        assert (await eager.principal(provider.token("rsa2"))).user_id == "ann"  # cached since
        assert provider.fetches == fetches + 1
    finally:
        provider.published.remove("rsa2")


def test_oidc_settings_name_what_is_missing() -> None:
    with pytest.raises(ValueError, match="MOZAIKS_OIDC_ISSUER needs MOZAIKS_OIDC_AUDIENCE"):
        Settings.from_env({"MOZAIKS_OIDC_ISSUER": "https://id.example.com/realms/x"})
    with pytest.raises(ValueError, match="need MOZAIKS_OIDC_ISSUER"):
        Settings.from_env({"MOZAIKS_JWKS_URL": "https://id.example.com/jwks"})
    oidc = Settings.from_env({"MOZAIKS_OIDC_ISSUER": "https://id.example.com", "MOZAIKS_OIDC_AUDIENCE": "a"})
    assert not oidc.local_mode and (oidc.claim_user, oidc.claim_app, oidc.claim_roles) == (
        "sub",
        "app_id",
        "roles",
    )


async def test_oidc_tokens_pass_on_rest_the_websocket_and_ag_ui_and_bad_ones_are_refused_with_their_code(
    start_node: Any, provider: Provider
) -> None:
    settings = provider.settings()
    node = await start_node(
        **{f: getattr(settings, f) for f in ("oidc_issuer", "oidc_audience", "claim_app", "claim_roles")}
    )
    ann = {"Authorization": f"Bearer {provider.token('ec1', 'ES256')}"}
    expired, _ = bad_tokens(provider)["expired"]
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        ready = await http.get("/health/ready")
        assert msgspec.json.decode(ready.content)["identity"] == "ok", ready.text
        # AG-UI: a run with a valid token streams to its end.
        async with http.stream(
            "POST", "/ag-ui/Analyzer", json=body("t-oidc", ("m1", "hi")), headers=ann
        ) as response:
            assert response.status_code == 200
            assert (await read_sse(response))[-1].type == "RUN_FINISHED"
        chats = (await http.get("/api/chats", headers=ann)).json()["chats"]
        assert [c["user_id"] for c in chats] == ["ann"]
        chat_id = chats[0]["chat_id"]
        for case, (token, code) in bad_tokens(provider).items():
            for method, path in (("GET", "/api/chats"), ("POST", "/ag-ui/Analyzer")):
                refused = await http.request(
                    method, path, json=body("t-x", ("m1", "x")), headers={"Authorization": f"Bearer {token}"}
                )
                assert (refused.status_code, refused.json()["error"]) == (401, code), (
                    case,
                    path,
                    refused.text,
                )
    async with connect(
        f"{node.ws_url}/ws/chats/{chat_id}?after=0", subprotocols=[f"bearer.{provider.token()}"]
    ) as ws:
        first = json.loads(await ws.recv())
        assert first["type"] == "event" and first["event"]["type"] == "chat.created"
    async with connect(f"{node.ws_url}/ws/chats/{chat_id}?after=0", subprotocols=[f"bearer.{expired}"]) as ws:
        assert json.loads(await ws.recv())["code"] == "token_expired"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_an_identity_provider_down_at_start_up_shows_in_readiness_instead_of_crashing(
    start_node: Any, provider: Provider
) -> None:
    port = free_port()  # nothing listens there
    node = await start_node(
        oidc_issuer=provider.issuer, oidc_audience=AUDIENCE, jwks_url=f"http://127.0.0.1:{port}/jwks"
    )
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        ready = await http.get("/health/ready")
        assert ready.status_code == 503, ready.text
        assert ready.json()["identity"].startswith("error: cannot fetch the identity provider's keys"), (
            ready.text
        )
        refused = await http.get("/api/chats", headers={"Authorization": f"Bearer {provider.token()}"})
        assert (refused.status_code, refused.json()["error"]) == (503, "identity_unavailable"), refused.text
