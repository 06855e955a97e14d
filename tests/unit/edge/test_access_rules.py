"""The access rules and the per-address bookkeeping (edge/access.py): deny wins, limits, buckets swept."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(60)


def test_access_rules_and_per_address_bookkeeping() -> None:
    import ipaddress

    from gsrv.config.policy import Policy
    from gsrv.edge.access import Admission, allowed

    nets = lambda *items: tuple(ipaddress.ip_network(i) for i in items)  # noqa: E731
    assert allowed("10.1.2.3", (), ())
    assert not allowed("10.1.2.3", nets("10.0.0.0/8"), nets("10.1.0.0/16"))  # deny wins
    assert allowed("::ffff:10.9.9.9", nets("10.0.0.0/8"), ())  # an IPv4-mapped peer is judged as IPv4
    assert allowed(None, (), nets("10.0.0.0/8")) and not allowed(None, nets("10.0.0.0/8"), ())  # unix peers
    door = Admission(Policy(max_sessions_per_ip=2, rate_per_ip=1.0, rate_burst=3))
    A = "192.0.2.1"
    assert [door.check(A, A, 0.0) for _ in range(3)] == [None, None, "per_ip_limit"]
    door.release(A)
    assert door.check(A, A, 0.0) is None  # the third token of the burst
    door.release(A)
    assert door.check(A, A, 0.5) == "rate_limited"  # half a token refilled
    assert door.check(A, A, 1.0) is None  # one whole token
    door.release(A)
    door.release(A)
    assert door.live == {}  # nothing kept for an address without sessions
    for n in range(2000):  # a flood from many addresses, then quiet: the full buckets are swept
        ip = f"10.0.{n // 256}.{n % 256}"
        assert door.check(ip, ip, 100.0) is None
        door.release(ip)
    door.check("192.0.2.2", "192.0.2.2", 200.0)
    assert list(door.buckets) == ["192.0.2.2"]
