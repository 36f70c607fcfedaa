"""ICE host candidates on loopback.

aioice skips 127.0.0.1 when gathering host candidates, so in a network namespace with
only `lo` nothing connects. `allow_loopback()` adds it (opt-in: the server's
`loopback_ice` setting, tests on machines without another interface).
"""

from __future__ import annotations

import aioice.ice

_original = aioice.ice.get_host_addresses


def _with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    addresses = _original(use_ipv4, use_ipv6)
    if use_ipv4 and "127.0.0.1" not in addresses:
        addresses.append("127.0.0.1")
    return addresses


def allow_loopback() -> None:
    aioice.ice.get_host_addresses = _with_loopback


def has_non_loopback_ipv4() -> bool:
    return any(a != "127.0.0.1" for a in _original(True, False))
