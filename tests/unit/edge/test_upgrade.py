"""The WebSocket upgrade's answer without a socket."""

from __future__ import annotations

from gsrv.edge.upgrade import accept_token


def test_the_accept_token_is_rfc_6455s_example() -> None:
    assert accept_token("dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3
