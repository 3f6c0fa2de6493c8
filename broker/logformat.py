"""Logs for people: one text format for every process ``make run`` starts (the server,
its clearing process, the demo and its agents), so their lines read as one log.

Kept apart from ``broker.observability`` (Prometheus, SQLAlchemy) so that the agent
and the developer CLI can use it with the client's dependencies alone.
"""

from __future__ import annotations

import logging
import sys

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"


class TextFormatter(logging.Formatter):
    """``12:03:04 INFO    broker.demo: message``; warnings and errors raised while a
    request was handled end with its id, which the JSON logs and the response carry."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        if rid and record.levelno >= logging.WARNING:
            line += f" (request {rid})"
        return line


def configure_text_logging(level: int = logging.INFO, *, debug_http: bool = False) -> None:
    """Route this process's logs to stderr as text; httpx's line per request only with
    ``debug_http``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug_http else logging.WARNING)
    if level > logging.DEBUG:
        handler.addFilter(quiet_jax)


def quiet_jax(record: logging.LogRecord) -> bool:
    """Drop JAX's info lines (a missing TPU library, a profile it does not use, for every
    compilation). A filter on the handler, since JAX sets its loggers' levels itself."""
    return record.levelno >= logging.WARNING or not record.name.startswith("jax")
