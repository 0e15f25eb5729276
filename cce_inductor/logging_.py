"""The ``cce_inductor`` logger, made visible through ``TORCH_LOGS=cce_inductor`` when torch allows it."""
from __future__ import annotations

import logging

LOGGER_NAME = "cce_inductor"
log = logging.getLogger(LOGGER_NAME)


def _register_with_torch_logs() -> None:
    """Best effort: let ``TORCH_LOGS="cce_inductor"`` (or ``+cce_inductor`` for DEBUG) turn our logs on.

    ``torch._logging._internal.register_log`` is private API; any failure leaves plain Python logging.
    """
    try:
        from torch._logging import _internal

        if LOGGER_NAME not in getattr(_internal.log_registry, "log_alias_to_log_qnames", {}):
            _internal.register_log(LOGGER_NAME, LOGGER_NAME)
            # TORCH_LOGS was parsed when torch was imported, before our name existed: parse it again.
            import os

            if os.environ.get("TORCH_LOGS"):
                _internal._init_logs()
    except Exception:  # pragma: no cover - depends on torch internals
        log.debug("could not register the cce_inductor logger with torch._logging", exc_info=True)


_register_with_torch_logs()

_warned: set = set()


def warn_once(msg: str, *args) -> None:
    """``log.warning(msg, *args)`` the first time this message (its format string) comes up in the process:
    a fallback that applies to every call is said once, not per step."""
    if msg in _warned:
        return
    _warned.add(msg)
    log.warning(msg, *args)
