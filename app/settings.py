"""Runtime settings, read once from the environment (names from the seed and ARCHITECTURE.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import cast
from urllib.parse import urlparse

import msgspec

from domain.files import DEFAULT_TYPES
from domain.model_io import RECORD_MODES, RecordMode


class SettingsError(ValueError):
    """An environment variable holds a value the runtime cannot use."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything configurable; see README's configuration table."""

    openai_api_key: str | None = None
    openai_model: str = "gpt-4o-mini"
    openai_base_url: str | None = None
    ai_enabled: bool = True
    workflows_path: Path = Path("workflows")
    database_uri: str | None = None
    db_name: str = "mozaiks"
    auth_secret: str | None = None
    prices_path: Path | None = None
    data_dir: Path = Path(".mozaiks")
    ws_heartbeat_s: float = 15.0
    ws_queue_max: int = 1000
    max_frame_bytes: int = 64 * 1024
    max_body_bytes: int = 1024 * 1024
    chat_starts_per_minute: int = 30
    lease_ttl_s: float = 30.0
    # Streaming: text chunks of a message are coalesced into one `message.delta` per window.
    stream_flush_ms: float = 50.0
    # Offline fixtures stream word by word, this far apart (0 = as fast as possible; env default 20).
    offline_chunk_ms: float = 0.0
    # Faults (README "Reliability"): database retry budget; model call tries, backoff and timeout.
    db_retry_s: float = 30.0
    llm_attempts: int = 4
    llm_backoff_s: float = 1.0
    llm_backoff_max_s: float = 30.0
    llm_timeout_s: float = 120.0
    # Browser origins allowed to call the API and the AG-UI endpoint (CORS); none by default.
    cors_origins: tuple[str, ...] = ()
    anchor_interval_s: float = 60.0
    # HMAC key of the tail anchors; None: derived from auth_secret, or a key file in data_dir.
    anchor_key: str | None = None
    max_concurrent_llm_calls: int = 256
    max_active_runs: int = 500
    # Uploads (domain/files.py): the largest file, and the content types allowed (`text/*` patterns).
    max_upload_mb: float = 20.0
    upload_types: tuple[str, ...] = DEFAULT_TYPES
    # Hooks (README "Hooks"): a hook running longer than this ends its run (reason hook).
    hook_timeout_s: float = 10.0
    # Budgets (README "Budgets"): per app and per user per UTC day limits; None = none.
    budgets_path: Path | None = None
    # MOZAIKS_RECORD_MODEL_IO: full (every call's exact request and response as parts), hashes, off.
    record_model_io: RecordMode = "full"
    # OIDC (README "Identity"): tokens signed by an identity provider, checked against its JWKS.
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    jwks_url: str | None = None  # None: discovered from the issuer's openid-configuration
    jwks_refresh_s: float = 60.0  # an unknown `kid` fetches the keys again at most this often
    oidc_leeway_s: float = 30.0
    claim_user: str = "sub"
    claim_app: str = "app_id"
    claim_roles: str = "roles"
    # OpenTelemetry (README "Traces"): OTLP/HTTP traces endpoint; None: no export.
    otel_traces_endpoint: str | None = None
    otel_capture_content: bool = False
    node_id: str = msgspec.field(default_factory=lambda: f"{os.uname().nodename}:{os.getpid()}")

    @property
    def offline(self) -> bool:
        """Workflows run on their scripted fixtures when no OpenAI endpoint is configured."""
        return not self.ai_enabled or (not self.openai_api_key and not self.openai_base_url)

    @property
    def max_upload_bytes(self) -> int:
        """MOZAIKS_MAX_UPLOAD_MB in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def local_mode(self) -> bool:
        """No auth secret and no OIDC issuer: loopback only, every request is the one local user."""
        return not self.auth_secret and not self.oidc_issuer

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables, failing with the variable's name on bad values."""
        env = os.environ if env is None else env

        def text(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        def number(name: str, default: float, *, zero: bool = False) -> float:
            raw = text(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise SettingsError(f"{name}={raw!r} is not a number") from None
            if value < 0 or (value == 0 and not zero):
                raise SettingsError(f"{name}={raw!r} must be {'zero or ' if zero else ''}positive")
            return value

        def origins(raw: str | None) -> tuple[str, ...]:
            found = tuple(origin.strip().rstrip("/") for origin in (raw or "").split(",") if origin.strip())
            for origin in found:
                parsed = urlparse(origin)
                if origin != "*" and (
                    parsed.scheme not in {"http", "https"} or not parsed.netloc or parsed.path
                ):
                    raise SettingsError(
                        f"MOZAIKS_CORS_ORIGINS: {origin!r} is not an origin like https://app.example.com (or *)"
                    )
            return found

        database_uri = text("DATABASE_URI")
        db_name = text("MOZAIKS_DB")
        if db_name is None and database_uri:
            db_name = urlparse(database_uri).path.lstrip("/").split("?")[0] or None
        enabled = (text("MOZAIKS_AI_ENABLED") or "true").lower()
        if enabled not in {"true", "false", "1", "0", "yes", "no"}:
            raise SettingsError(f"MOZAIKS_AI_ENABLED={enabled!r} must be true or false")
        prices = text("MOZAIKS_PRICES")
        record_io = (text("MOZAIKS_RECORD_MODEL_IO") or "full").lower()
        if record_io not in RECORD_MODES:
            raise SettingsError(f"MOZAIKS_RECORD_MODEL_IO={record_io!r} must be full, hashes or off")
        issuer, audience, jwks_url = (
            text("MOZAIKS_OIDC_ISSUER"),
            text("MOZAIKS_OIDC_AUDIENCE"),
            text("MOZAIKS_JWKS_URL"),
        )
        if issuer and not audience:
            raise SettingsError(
                "MOZAIKS_OIDC_ISSUER needs MOZAIKS_OIDC_AUDIENCE (the client id tokens are for)"
            )
        if (audience or jwks_url) and not issuer:
            raise SettingsError("MOZAIKS_OIDC_AUDIENCE and MOZAIKS_JWKS_URL need MOZAIKS_OIDC_ISSUER")
        for name, url in (("MOZAIKS_OIDC_ISSUER", issuer), ("MOZAIKS_JWKS_URL", jwks_url)):
            if url and urlparse(url).scheme not in {"http", "https"}:
                raise SettingsError(f"{name}={url!r} must be an http(s) URL")
        otel_base = text("OTEL_EXPORTER_OTLP_ENDPOINT")
        traces_endpoint = text("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
            f"{otel_base.rstrip('/')}/v1/traces" if otel_base else None
        )
        return cls(
            openai_api_key=text("OPENAI_API_KEY"),
            openai_model=text("OPENAI_MODEL") or "gpt-4o-mini",
            openai_base_url=text("OPENAI_BASE_URL"),
            ai_enabled=enabled in {"true", "1", "yes"},
            workflows_path=Path(text("MOZAIKS_WORKFLOWS_PATH") or "workflows"),
            database_uri=database_uri,
            db_name=db_name or "mozaiks",
            auth_secret=text("MOZAIKS_AUTH_SECRET"),
            prices_path=Path(prices) if prices else None,
            data_dir=Path(text("MOZAIKS_DATA_DIR") or ".mozaiks"),
            ws_heartbeat_s=number("MOZAIKS_WS_HEARTBEAT_S", 15.0),
            ws_queue_max=int(number("MOZAIKS_WS_QUEUE_MAX", 1000)),
            chat_starts_per_minute=int(number("MOZAIKS_CHAT_STARTS_PER_MINUTE", 30)),
            lease_ttl_s=number("MOZAIKS_LEASE_TTL_S", 30.0),
            stream_flush_ms=number("MOZAIKS_STREAM_FLUSH_MS", 50.0, zero=True),
            offline_chunk_ms=number("MOZAIKS_OFFLINE_CHUNK_MS", 20.0, zero=True),
            db_retry_s=number("MOZAIKS_DB_RETRY_S", 30.0),
            llm_attempts=int(number("MOZAIKS_LLM_ATTEMPTS", 4)),
            llm_backoff_s=number("MOZAIKS_LLM_BACKOFF_S", 1.0),
            llm_backoff_max_s=number("MOZAIKS_LLM_BACKOFF_MAX_S", 30.0),
            llm_timeout_s=number("MOZAIKS_LLM_TIMEOUT_S", 120.0),
            cors_origins=origins(text("MOZAIKS_CORS_ORIGINS")),
            anchor_interval_s=number("MOZAIKS_ANCHOR_INTERVAL_S", 60.0),
            anchor_key=text("MOZAIKS_ANCHOR_KEY"),
            max_concurrent_llm_calls=int(number("MOZAIKS_MAX_CONCURRENT_LLM_CALLS", 256)),
            max_active_runs=int(number("MOZAIKS_MAX_ACTIVE_RUNS", 500)),
            hook_timeout_s=number("MOZAIKS_HOOK_TIMEOUT_S", 10.0),
            budgets_path=Path(budgets) if (budgets := text("MOZAIKS_BUDGETS_FILE")) else None,
            record_model_io=cast(RecordMode, record_io),  # checked against RECORD_MODES above
            oidc_issuer=issuer,
            oidc_audience=audience,
            jwks_url=jwks_url,
            jwks_refresh_s=number("MOZAIKS_JWKS_REFRESH_S", 60.0, zero=True),
            oidc_leeway_s=number("MOZAIKS_OIDC_LEEWAY_S", 30.0, zero=True),
            claim_user=text("MOZAIKS_CLAIM_USER") or "sub",
            claim_app=text("MOZAIKS_CLAIM_APP") or "app_id",
            claim_roles=text("MOZAIKS_CLAIM_ROLES") or "roles",
            otel_traces_endpoint=traces_endpoint,
            otel_capture_content=(text("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT") or "").lower()
            in {"true", "1", "yes"},
            max_upload_mb=number("MOZAIKS_MAX_UPLOAD_MB", 20.0),
            upload_types=tuple(
                t.strip() for t in (text("MOZAIKS_UPLOAD_TYPES") or "").split(",") if t.strip()
            )
            or DEFAULT_TYPES,
        )
