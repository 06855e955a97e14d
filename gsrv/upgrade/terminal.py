"""The terminal page's sessions across an upgrade (`pty = true`, `transport = "websocket"`, the
gsrv-term protocol with `reattach`): detached and reattached. The page's connection is not
carried: it closes at the exec (the page sees a close without a close frame, 1006, and
reconnects with its session's token and the offset it has, as after any drop); a watcher's
page likewise, with its watch token. What moves is the session: its pty master and child,
the seat's token, the output window with the output kept (at most `reattach_buffer`), the
watchers' token, each direction's phase and meters. The new code's relay starts detached, so
its output is kept (then the child blocks) and its input waits for the page's return, within
`reattach` as for any drop.
"""

from __future__ import annotations

import base64
import socket as stdsocket
from typing import Any

from gevent import socket as gsocket

from gsrv.config.web import WebSocketConfig
from gsrv.edge.httphead import Request
from gsrv.edge.stream import PlainStream
from gsrv.edge.upgrade import Upgraded
from gsrv.edge.wsframes import FrameReader
from gsrv.relay.childend import PtyEnd
from gsrv.relay.ws.relay import WebSocketRelay


def terminal_movable(relay: object) -> bool:
    """The terminal page's session with reattach, on a pty, unrecorded, without a stderr channel."""
    return (type(relay) is WebSocketRelay and relay.term and relay.seat is not None and not relay.seat.ended
            and isinstance(relay.child_end, PtyEnd) and relay.recording is None
            and not relay.stderr_channel)  # fmt: skip


def terminal_facts(relay: WebSocketRelay) -> dict[str, Any]:
    """What the new code needs of it beyond a pumping relay's facts."""
    seat, watchers, window, end = relay.seat, relay.watchers, relay.client.window, relay.child_end
    assert seat is not None and isinstance(end, PtyEnd)
    kept = window.handed_over()
    pieces = kept.pop("kept")
    assert pieces is None or isinstance(pieces, list)
    return {"token": seat.token, "drops": seat.drops,
            "watch": None if watchers is None else watchers.token,
            "window": {**kept, "kept": None if pieces is None else [base64.b64encode(p).decode() for p in pieces]},
            "hung_up": end.hung_up, "last": base64.b64encode(end.last).decode()}  # fmt: skip


def terminal_relay(facts: dict[str, Any], ws: WebSocketConfig, chunk: int, eof_grace: float) -> WebSocketRelay:
    """The relay, detached, its page's connection gone: a closed placeholder socket stands for
    it until the page reattaches (the seat's first link; nothing is read or sent on it)."""
    placeholder = gsocket.socket(stdsocket.AF_INET, stdsocket.SOCK_STREAM)
    placeholder.close()
    request = Request("GET", ws.path, "1.1", (), ws.path, "")
    upgraded = Upgraded(request, b"", PlainStream(placeholder), term=True, reader=FrameReader())
    end = PtyEnd(eof_grace)
    end.hung_up, end.carried = bool(facts["hung_up"]), base64.b64decode(facts["last"])
    relay = WebSocketRelay(placeholder, chunk, upgraded, ws, end, stderr_channel=False)
    if relay.seat is None:
        raise ValueError("the service's websocket table no longer has reattach: the session cannot wait for its page")
    window = facts["window"]
    kept = window["kept"]
    relay.client.window.take_over(int(window["sent"]), int(window["acked"]), bool(window["on"]), int(window["base"]),
                                  int(window["skip"]),
                                  None if kept is None else [base64.b64decode(p) for p in kept])  # fmt: skip
    relay.seat.moved(str(facts["token"]), int(facts["drops"]))
    if relay.watchers is not None and facts["watch"] is not None:
        relay.watchers.token = str(facts["watch"])
    return relay
