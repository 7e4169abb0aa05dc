"""`/schema`'s documentation page, served under the site's own CSP.

Litestar's stock render plugins (Scalar, Redoc, Swagger…) load their JavaScript from a CDN and start
it with an inline script, both of which the runtime's Content-Security-Policy blocks (and a runtime
may have no internet at all). This page is plain HTML whose one script and stylesheet are the
runtime's own static files: `/static/js/schema.js` reads `/schema/openapi.json` and lists every
operation with its parameters, body and answers.
"""

from __future__ import annotations

from html import escape
from typing import Any

from litestar import Request
from litestar.openapi.plugins import OpenAPIRenderPlugin


class SchemaPage(OpenAPIRenderPlugin):
    """The OpenAPI document as a readable page at `/schema` (and `/schema/docs`)."""

    def __init__(self) -> None:
        super().__init__(path=["/", "/docs"])

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        info = openapi_schema.get("info") or {}
        title = escape(f"{info.get('title', 'API')} {info.get('version', '')}".strip())
        source = escape(self.get_openapi_json_route(request))
        return f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <meta name="color-scheme" content="light dark">
  <title>{title} · API</title>
  <link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
  <link rel="stylesheet" href="/static/analyst.css">
  <script type="module" src="/static/js/schema.js"></script>
</head>
<body data-openapi="{source}">
  <header class="bar">
    <a class="brand" href="/"><img src="/static/favicon.svg" alt="" width="22" height="22"> Mozaiks</a>
    <h1>{title} · REST API</h1>
    <a href="{source}">openapi.json</a>
  </header>
  <main id="schema" data-testid="schema-page">
    <p id="status" class="status" role="status">Loading the OpenAPI document…</p>
  </main>
</body>
</html>
""".encode()
