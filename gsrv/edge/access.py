"""Who may start a session: allow/deny rules, sessions per address, a rate per address.

Pure bookkeeping, no I/O: `Admission.check(rule_ip, ip, now)` returns the refusal reason or None
and, when None, counts the address's session until `release(ip)`. The tables hold only
addresses with a live session or a bucket still refilling (full buckets are swept once per
refill time, or per SWEEP_EVERY new addresses), so a flood from many addresses leaves
nothing behind once it stops.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gsrv.config.policy import Network, Policy

SWEEP_EVERY = 1024  # buckets added between sweeps of the full ones


def allowed(ip: str | None, allow: tuple[Network, ...], deny: tuple[Network, ...]) -> bool:
    """Deny wins; an empty allow list allows everyone not denied. No address (a unix
    socket's client): no deny names it, and an allow list does not either."""
    if ip is None or not (allow or deny):
        return not allow
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in net for net in deny):
        return False
    return not allow or any(address in net for net in allow)


@dataclass
class Bucket:
    tokens: float
    at: float


class Admission:
    """One service's per-address counts and token buckets; the policy may change on reload."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.live: dict[str, int] = {}  # address -> sessions counted (pending or running)
        self.buckets: dict[str, Bucket] = {}
        self._added = 0
        self._swept = 0.0

    def check(self, rule_ip: str | None, ip: str | None, now: float) -> str | None:
        """The reason to refuse a session now, or None (and it is counted against ip until
        release). rule_ip is the address allow/deny judge (access_on), ip the client's."""
        p = self.policy
        if not allowed(rule_ip, p.allow, p.deny):
            return "denied"
        key = ip or "unix"
        if p.max_sessions_per_ip and self.live.get(key, 0) >= p.max_sessions_per_ip:
            return "per_ip_limit"
        if p.rate_per_ip and not self._take(key, now):
            return "rate_limited"
        self.live[key] = self.live.get(key, 0) + 1
        return None

    def hold(self, ip: str | None) -> None:
        """Count a session admitted before (an upgrade's): no rule is asked again."""
        key = ip or "unix"
        self.live[key] = self.live.get(key, 0) + 1

    def release(self, ip: str | None) -> None:
        key = ip or "unix"
        left = self.live.get(key, 0) - 1
        if left > 0:
            self.live[key] = left
        else:
            self.live.pop(key, None)

    def _take(self, key: str, now: float) -> bool:
        rate, burst = self.policy.rate_per_ip, self.policy.rate_burst
        if self._added >= SWEEP_EVERY or now - self._swept >= burst / rate:
            self._sweep(now)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = Bucket(float(burst), now)
            self._added += 1
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _sweep(self, now: float) -> None:
        """Forget buckets that have refilled: a fresh one would be the same."""
        rate, burst = self.policy.rate_per_ip, self.policy.rate_burst
        self.buckets = {k: b for k, b in self.buckets.items() if b.tokens + (now - b.at) * rate < burst}
        self._added, self._swept = 0, now
