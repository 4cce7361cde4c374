"""uvicorn's h11 protocol with request read deadlines (``uvicorn … --http api.server:TimedH11Protocol``).

uvicorn times out idle keep-alive connections but not a request that arrives slowly: a client that
sends half a header (slowloris) or trickles a body holds its connection for ever. Here the request
headers must arrive within ``MUST_API__HEADER_TIMEOUT_S`` of the first byte (or of the connection),
and the whole body within ``MUST_API__BODY_TIMEOUT_S`` after the headers; otherwise the connection
is closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from must_core.settings import get_settings

_logger = logging.getLogger(__name__)


class TimedH11Protocol(H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        api = get_settings().api
        self._limits = {"headers": api.header_timeout_s, "body": api.body_timeout_s}
        self._phase: str | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE:
            self._arm("headers")  # a next request on a kept-alive connection started
        elif state is h11.SEND_BODY:
            self._arm("body")
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        self._disarm()  # idle from here: uvicorn's keep-alive timeout applies
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, phase: str) -> None:
        if self._phase == phase:
            return
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(self._limits[phase], self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expired(self, phase: str) -> None:
        _logger.warning("closing a connection whose request %s did not arrive in time", phase)
        self._deadline, self._phase = None, None
        if not self.transport.is_closing():
            self.transport.close()
