"""The REST contract: `/schema` documents every response, every error has one shape, and schemathesis
finds no response that breaks the schema (nor any 500) against the live app, with and without auth."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.http.auth import issue_token
from app.http.server import create_app
from app.settings import Settings
from domain.events import MessageAgent, Pending, StreamRef

SECRET = "contract-secret-of-at-least-thirty-two-bytes"
BIN = Path(sys.executable).parent


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and "responses" in operation
    ]


def test_every_2xx_of_every_route_has_a_schema() -> None:
    schema = create_app(Settings()).openapi_schema.to_schema()
    operations = _operations(schema)
    assert len(operations) >= 14
    for method, path, operation in operations:
        successes = {status: r for status, r in operation["responses"].items() if status.startswith("2")}
        assert successes, (method, path)
        for status, response in successes.items():
            content = response.get("content") or {}
            assert content, (method, path, status)
            for media_type, body in content.items():
                described = body.get("schema") or {}
                if "$ref" in described:
                    name = described["$ref"].rsplit("/", 1)[-1]
                    described = schema["components"]["schemas"][name]
                    assert described.get("properties"), (method, path, status, name)
                else:
                    assert described.get("type") not in (None, "object") or described.get("properties"), (
                        method,
                        path,
                        status,
                        media_type,
                    )
        for status, response in operation["responses"].items():
            if status[0] in "45":
                # Every error is documented with the one error shape (or, for readiness, its own body).
                refs = {c["schema"].get("$ref", "") for c in response.get("content", {}).values()}
                assert refs and refs <= {
                    "#/components/schemas/ErrorBody",
                    "#/components/schemas/Readiness",
                }, (
                    method,
                    path,
                    status,
                )


def _is_error_shape(body: Any, code: str) -> bool:
    return (
        isinstance(body, dict)
        and body.get("error") == code
        and isinstance(body.get("detail"), str)
        and body["detail"]
        and set(body) <= {"error", "detail", "fields"}
    )


async def test_every_error_has_one_shape_litestars_own_included(start_node: Any, store: Any) -> None:
    node = await start_node(auth_secret=SECRET, max_body_bytes=2048, chat_starts_per_minute=3)
    await store.append(
        StreamRef(chat_id="theirs", app_id="P", user_id="someone-else", workflow="Analyzer"),
        [Pending(event=MessageAgent(content="hello"), agent="Analyst")],
        0,
    )
    user = {"Authorization": f"Bearer {issue_token(SECRET, 'u', 'P', ['user'])}"}
    async with httpx.AsyncClient(base_url=node.url) as http:
        cases = [
            (await http.get("/api/chats"), 401, "unauthorized"),
            (await http.get("/api/chats", headers={"Authorization": "Bearer nope"}), 401, "unauthorized"),
            (await http.get("/api/chats", params={"limit": "0"}, headers=user), 400, "bad_request"),
            (
                await http.post("/api/chats", json={"workflow": "Analyzer", "mesage": "x"}, headers=user),
                400,
                "bad_request",
            ),
            (await http.get("/metrics/perf/aggregate", headers=user), 403, "forbidden"),
            (await http.get("/api/chats/theirs/events", headers=user), 403, "forbidden"),
            (await http.get("/api/chats/none/events", headers=user), 404, "unknown_chat"),
            (await http.get("/api/nothing-here", headers=user), 404, "not_found"),
            (
                await http.post("/api/chats", json={"workflow": "Nope", "message": "x"}, headers=user),
                404,
                "unknown_workflow",
            ),
            (await http.delete("/api/chats", headers=user), 405, "method_not_allowed"),
            (
                await http.post(
                    "/api/chats", json={"workflow": "Analyzer", "message": "x" * 5000}, headers=user
                ),
                413,
                "too_large",
            ),
            (await http.post("/api/chats/theirs/stop", headers=user), 403, "forbidden"),
        ]
        for response, status, code in cases:
            assert response.status_code == status, (response.request.url, response.text)
            assert _is_error_shape(response.json(), code), (response.request.url, response.text)
        bad_limit = (await http.get("/api/chats", params={"limit": "0"}, headers=user)).json()
        assert [f["name"] for f in bad_limit["fields"]] == ["limit"] and bad_limit["fields"][0][
            "source"
        ] == "query"
        typo = cases[3][0].json()
        assert typo["fields"] and "mesage" in str(typo["fields"]), typo
        # The rate limit counted the refused starts above; the next start is refused with its own code.
        limited = await http.post("/api/chats", json={"workflow": "Analyzer", "message": "x"}, headers=user)
        assert limited.status_code == 429 and _is_error_shape(limited.json(), "rate_limited"), limited.text
        assert "ratelimit-reset" in limited.headers, "the limiter's headers say when to retry"


async def _schemathesis(node: Any, headers: dict[str, str], tmp: Path, name: str) -> None:
    argv = [
        str(BIN / "schemathesis"),
        "run",
        f"{node.url}/schema/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,ignored_auth",
        "--max-examples",
        os.environ.get("MOZAIKS_SCHEMATHESIS_EXAMPLES", "6"),
        "--phases",
        "examples,coverage,fuzzing",
        "--seed",
        "12",
        "--no-shrink",
        "--request-timeout",
        "30",
        "--generation-database",
        ":memory:",
        "--report-dir",
        str(tmp / name),
        *[arg for key, value in headers.items() for arg in ("-H", f"{key}: {value}")],
    ]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp
    )
    output, _ = await process.communicate()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]


@pytest.mark.timeout(600)
async def test_schemathesis_finds_no_server_error_and_no_response_off_the_schema(
    start_node: Any, store: Any, tmp_path: Path
) -> None:
    node = await start_node(auth_secret=SECRET, chat_starts_per_minute=10_000)
    token = issue_token(SECRET, "st", "P", ["user", "auditor", "analyst"])
    await store.append(
        StreamRef(chat_id="st-chat", app_id="P", user_id="st", workflow="Analyzer"),
        [Pending(event=MessageAgent(content="hello"), agent="Analyst")],
        0,
    )
    # Both runs at once against the one node: each is mostly waiting on the other side of the socket.
    await asyncio.gather(
        _schemathesis(node, {"Authorization": f"Bearer {token}"}, tmp_path, "with-auth"),
        _schemathesis(node, {}, tmp_path, "without-auth"),
    )


def test_the_chatui_codes_module_matches_the_servers_codes() -> None:
    from app.http import codes

    path = Path(__file__).resolve().parents[1] / "app" / "static" / "js" / "codes.js"
    assert path.read_text() == codes.javascript(), (
        "app/static/js/codes.js is stale: regenerate it with\n"
        "python -c 'from app.http.codes import javascript; print(javascript(), end=\"\")' > app/static/js/codes.js"
    )


def test_readme_rest_table_matches_the_schema() -> None:
    import re

    schema = create_app(Settings()).openapi_schema.to_schema()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## REST\n", 1)[1].split("\n### ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| `")]
    documented: dict[tuple[str, str], str] = {}
    for endpoints, _, what in rows:
        method = ""
        for token in re.findall(r"`([^`]+)`", endpoints):
            parts = token.split()
            method, path = (parts[0], parts[1]) if len(parts) == 2 else (method, parts[0])
            documented[(method, re.sub(r"\{[^}]*\}", "{}", path))] = what
    operations = {(m, re.sub(r"\{[^}]*\}", "{}", p)): op for m, p, op in _operations(schema)}
    assert set(operations) == set(documented) - {("GET", "/schema")}, "README's REST table and /schema differ"

    def names(node: Any, seen: set[str]) -> set[str]:
        found: set[str] = set()
        if isinstance(node, dict):
            if "$ref" in node:
                name = node["$ref"].rsplit("/", 1)[-1]
                if name not in seen:
                    found |= names(schema["components"]["schemas"][name], seen | {name})
            found |= set(node.get("properties", {}))
            for value in node.values():
                found |= names(value, seen)
        elif isinstance(node, list):
            for value in node:
                found |= names(value, seen)
        return found

    for endpoints, _, what in rows:
        keys = [key for key, text in documented.items() if text is what]
        known: set[str] = set()
        for key in keys:
            operation = operations.get(key)
            if operation is None:
                continue
            known |= {p["name"] for p in operation.get("parameters", [])}
            known |= names(operation.get("requestBody", {}), set())
            known |= names({s: r for s, r in operation["responses"].items() if s.startswith("2")}, set())
        if not known:
            continue
        for token in re.findall(r"`([^`]+)`", what):
            fields = re.findall(r"[a-z_]+", token[1:-1]) if token.startswith("{") else [token]
            for field in fields:
                if re.fullmatch(r"[a-z_]+", field):
                    assert field in known, (
                        f"README names `{field}` for {endpoints.strip()}, which /schema does not"
                    )


def test_rest_and_the_websocket_name_an_error_with_the_same_code() -> None:
    from litestar.exceptions import NotAuthorizedException

    from app.http import codes
    from app.http.errors import error_code
    from app.runs.supervisor import NoActiveRun, RunActive
    from domain.errors import UnknownChat

    assert error_code(RunActive("c", "r")) == codes.RUN_ACTIVE == "run_active"
    assert error_code(NoActiveRun("c")) == codes.NO_ACTIVE_RUN
    assert error_code(UnknownChat("c")) == codes.UNKNOWN_CHAT
    assert error_code(NotAuthorizedException("no")) == codes.UNAUTHORIZED


def test_each_error_a_route_raises_answers_its_status_code_and_headers_and_an_unexpected_one_hides_its_cause() -> (
    None
):
    """The mapping of app/http/errors.py, route by route, in a bare Litestar app with the runtime's handlers."""
    import structlog.testing
    from litestar import Litestar, get, post
    from litestar.exceptions import HTTPException
    from litestar.params import Parameter
    from litestar.testing import TestClient
    from pymongo.errors import AutoReconnect, ServerSelectionTimeoutError

    from app.http.auth import IdentityUnavailable, TokenRefused
    from app.http.errors import (
        EXCEPTION_HANDLERS,
        STORAGE_RETRY_AFTER_S,
        ErrorBody,
        Refused,
        error_responses,
    )
    from app.runs.supervisor import NoActiveRun, NodeBusy, RunActive
    from app.runs.workflows import UnknownWorkflow
    from domain.errors import Conflict, CorruptRecord, StorageUnavailable, UnknownChat

    raised: dict[str, Exception] = {
        "unknown-chat": UnknownChat("c1"),
        "unknown-workflow": UnknownWorkflow("Nope", ["Analyzer"]),
        "conflict": Conflict("c1", 3, "taken"),
        "run-active": RunActive("c1", "r1"),
        "no-active-run": NoActiveRun("c1"),
        "node-busy": NodeBusy(4, 7),
        "corrupt": CorruptRecord("c1", 2, "bad"),
        "spent": StorageUnavailable("read chat c1", 3, 1.5, AutoReconnect("down")),
        "raw-connection": AutoReconnect("connection closed"),
        "no-server": ServerSelectionTimeoutError("no server"),
        "refused": Refused(418, "teapot", "short and stout"),
        "http-429": HTTPException(status_code=429, detail="slow down", headers={"RateLimit-Reset": "9"}),
        "http-418": HTTPException(status_code=418, detail="odd"),
        # Problems listed with a status other than 400 are not invalid fields: no `fields`.
        "http-404": HTTPException(status_code=404, detail="gone", extra=[{"key": "x", "message": "m"}]),
        "http-500": HTTPException(status_code=500, detail="broken"),
        "identity": IdentityUnavailable("the identity provider's keys cannot be fetched"),
        "token": TokenRefused("token_expired", "the token expired"),
        "bug": RuntimeError("secret internals"),
    }

    @get("/raise/{name:str}", sync_to_thread=False)
    def raise_it(name: str) -> None:
        raise raised[name]

    @get("/refuse-fields", sync_to_thread=False)
    def refuse_fields() -> None:  # a 400 raised by the app itself, its problems partly described
        raise HTTPException(
            status_code=400, detail="bad", extra=[{"message": "no key"}, {"key": "k"}, "not a problem"]
        )

    @post("/validate", sync_to_thread=False)
    def validate(data: dict[str, int], limit: int = Parameter(ge=1)) -> None:
        return None

    app = Litestar([raise_it, refuse_fields, validate], exception_handlers=EXCEPTION_HANDLERS, debug=False)
    retry = str(STORAGE_RETRY_AFTER_S)
    expected = {
        "unknown-chat": (404, "unknown_chat", None),
        "unknown-workflow": (404, "unknown_workflow", None),
        "conflict": (409, "conflict", None),
        "run-active": (409, "run_active", None),
        "no-active-run": (409, "no_active_run", None),
        "node-busy": (503, "node_busy", "7"),
        "corrupt": (500, "corrupt_record", None),
        "spent": (503, "storage_unavailable", retry),
        "raw-connection": (503, "storage_unavailable", retry),
        "no-server": (503, "storage_unavailable", retry),
        "refused": (418, "teapot", None),
        "http-429": (429, "rate_limited", None),
        "http-418": (418, "error", None),
        "http-404": (404, "not_found", None),
        "http-500": (500, "internal_error", None),
        "identity": (503, "identity_unavailable", retry),
        "token": (401, "token_expired", None),
        "bug": (500, "internal_error", None),
    }
    details = {
        "refused": "short and stout",
        "http-429": "slow down",
        "http-418": "odd",
        "http-404": "gone",
        "http-500": "broken",
        "token": "the token expired",
    }
    # What the server log records: every 5xx, with the request's method and path; no 4xx.
    failed = {"node-busy", "corrupt", "spent", "raw-connection", "no-server", "http-500", "identity"}
    with TestClient(app) as client:
        answers = {}
        for name in raised:
            with structlog.testing.capture_logs() as crashes:
                response = client.get(f"/raise/{name}")
            body = response.json()
            assert set(body) == {"error", "detail"} and body["detail"], (name, body)
            assert response.headers["content-type"] == "application/json", name
            logged_failures = [
                (e["log_level"], e["method"], e["path"]) for e in crashes if e["event"] == "request.failed"
            ]
            assert logged_failures == ([("error", "GET", f"/raise/{name}")] if name in failed else []), name
            if name in failed:
                assert raised[name].__class__.__name__ in str(crashes[0]["error"]), name
            answers[name] = (response.status_code, body["error"], response.headers.get("Retry-After"))
            if name == "bug":
                assert "secret" not in body["detail"] and "server log" in body["detail"]
                [logged] = [e for e in crashes if e["event"] == "request.crashed"]
                # The server log has the details the answer leaves out: what crashed, where, and why.
                assert (logged["log_level"], logged["method"], logged["path"]) == (
                    "error",
                    "GET",
                    "/raise/bug",
                )
                assert logged["exc_info"] is raised["bug"]
            else:
                assert body["detail"] == details.get(name, str(raised[name])), name
        assert answers == expected
        assert client.get("/raise/http-429").headers["RateLimit-Reset"] == "9"
        assert client.get("/raise/refused").json()["detail"] == str(raised["refused"]) == "short and stout"
        partial = client.get("/refuse-fields").json()
        assert partial["fields"] == [
            {"name": "", "message": "no key", "source": None},
            {"name": "k", "message": "", "source": None},
        ], partial
        invalid = client.post("/validate", params={"limit": "0"}, json={"a": 1})
        assert invalid.status_code == 400 and invalid.json()["error"] == "bad_request"
        [field] = invalid.json()["fields"]
        assert (field["name"], field["source"]) == ("limit", "query") and field["message"], field
        typed = client.post("/validate", params={"limit": "2"}, json={"a": "x"})
        assert typed.status_code == 400 and typed.json()["fields"], typed.json()
        assert [(f["name"], f["source"]) for f in typed.json()["fields"]] == [("data", "body")]
        assert all(f["message"] for f in typed.json()["fields"])
    # The OpenAPI side: every route documents 400, 500 and 503 besides its own, each with the one shape.
    documented = error_responses(404, 409)
    assert sorted(documented) == [400, 404, 409, 500, 503]
    assert all(spec.data_container is ErrorBody for spec in documented.values())
    assert documented[503].description and "Retry-After" in documented[503].description
    assert documented[404].examples[0].value == {"error": "not_found", "detail": "…"}
