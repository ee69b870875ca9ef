"""Limits on the server's TCP connections, which uvicorn leaves open: a cap on how many are
open at once (one more is answered with a 503 in OpenAI's shape and closed at once, so that
the process never runs out of file descriptors), and a deadline for a request to arrive
(a connection that opens and sends nothing, or half a request head, is closed instead of
holding its descriptor forever). uvicorn's own keep-alive timeout closes idle connections
between requests; the request body's deadline is the Guard's (llama.serve.app).

The protocol is uvicorn's h11 one with these two additions; `limited_protocol` makes the
class uvicorn.Config(http=...) takes.
"""

import asyncio
import json
from typing import Optional, Type

from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import APIError


def _refusal(max_connections: int) -> bytes:
    """A whole HTTP response refusing a connection over the cap."""
    body = json.dumps(APIError(503, f"the server has {max_connections} connections open, as many as it takes "
                                    f"(--max_connections); retry later", "server_error",
                               code="too_many_connections").body()).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    return head + body


class LimitedProtocol(H11Protocol):
    max_connections: int = 1024
    head_timeout_s: float = 15.0
    _deadline: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_refusal(self.max_connections))
            transport.close()
            return
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection has the same deadline

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.head_timeout_s, self._overdue)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _overdue(self) -> None:
        """No request head has arrived in time: close, unless a request is being answered."""
        self._deadline = None
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            self.transport.close()


def limited_protocol(max_connections: int, head_timeout_s: float) -> Type[LimitedProtocol]:
    """The protocol class for uvicorn.Config(http=...) with these limits."""
    return type("LimitedProtocol", (LimitedProtocol,),
                {"max_connections": max_connections, "head_timeout_s": head_timeout_s})
