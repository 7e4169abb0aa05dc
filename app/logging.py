"""structlog configuration: JSON lines (a console renderer on a TTY), stdlib loggers routed through it."""

from __future__ import annotations

import logging
import sys

import structlog

_shared: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


# Loggers that `import autogen` (or a run) would give a stdout handler of their own.
_AG2_CONSOLE_LOGGERS = ("autogen.oai.client", "autogen.oai.cohere", "ag2.event.processor")


def configure_logging(level: str = "INFO", *, json: bool | None = None) -> None:
    """Send structlog and stdlib logs (the `autogen` logger among them) through one renderer on stderr.

    `chat_id` and `run_id` are bound with `structlog.contextvars.bound_contextvars` where a run starts.
    """
    use_json = not sys.stderr.isatty() if json is None else json
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[*_shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("autogen", "ag2"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # AG2 gives these loggers a stdout handler of its own when they have none: a placeholder here keeps
    # it off, without importing AG2 (seconds) in commands that never run a workflow. The client's
    # records reach ours through the root; AG2's console echo of events (its event processor turns
    # `propagate` off) goes nowhere: the runtime records every event itself.
    for name in _AG2_CONSOLE_LOGGERS:
        logging.getLogger(name).handlers[:] = [logging.NullHandler()]
    logging.getLogger("autogen").setLevel(logging.WARNING if level.upper() == "INFO" else level.upper())
    for noisy in ("pymongo", "httpx", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named after its module."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
