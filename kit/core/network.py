"""What may reach the network: kit works offline, and private text goes only to this machine.

Two loopback checks with different promises: `is_loopback_host` decides from the name alone (a
lookup would itself be a request, and a name can point anywhere), for hosts private data would be
sent to; `resolves_only_to_loopback` looks the name up, for an address kit is asked to listen on.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import urllib.parse


def go_offline() -> None:
    """Make the Hugging Face libraries refuse network access (kit only loads local folders).

    Respects an HF_HUB_OFFLINE the user set. Must run before transformers is imported to take full
    effect; when huggingface_hub is already imported its module constant is set too.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE"):
        constants.HF_HUB_OFFLINE = True


def is_loopback_host(host: str | None) -> bool:
    """Whether `host` names this machine without a lookup: a literal loopback address
    (127.0.0.0/8, ::1) or `localhost` itself, spelled exactly so.

    Other names count as remote: resolving them would itself be a network request, and a name can
    point anywhere. That includes `*.localhost` and the fully qualified `localhost.`: the hosts
    file lists `localhost` alone, so the resolver sends `localhost.` to DNS like any other name."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolves_only_to_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is a loopback address (reachable from this machine only)."""
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def redact_url(url: str | None) -> str | None:
    """`url` as kit records it (cards, ledgers, logs): scheme, host, port and path only. Userinfo
    (`user:SECRET@`), query and fragment can carry credentials and never leave this function."""
    if not url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "<url>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port is not None else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
