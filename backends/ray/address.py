"""`--address HOST:PORT`: is anything listening there? Checked with a socket timeout
before ray.init, which would otherwise retry a dead address for minutes."""
from __future__ import annotations

import socket

from graphrl.errors import UsageError

CONNECT_TIMEOUT_S = 10.0


def check_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """UsageError when HOST:PORT does not accept a TCP connection within `timeout_s`.
    "auto" and ray:// client addresses are left to Ray."""
    if address == "auto" or "://" in address:
        return
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.1:6379) or "
                         "auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port_text)), timeout=timeout_s):
            pass
    except socket.timeout:
        raise UsageError(f"--address {address}: no answer within {timeout_s:g} s") from None
    except OSError as e:
        raise UsageError(f"--address {address}: cannot connect "
                         f"({e.strerror or type(e).__name__}); is `ray start --head` "
                         "running there?") from None


__all__ = ["check_address", "CONNECT_TIMEOUT_S"]
