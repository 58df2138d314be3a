"""What visiontune's local web apps (`serve`, the `review` pages) share: which requests
they answer, and the address to open.

A page on localhost can be reached by any web site the user visits, through DNS
rebinding (a name of the attacker's that resolves to 127.0.0.1): the browser then sends
that name in the Host header. So the apps answer only requests addressed to this machine
(localhost, 127.0.0.1, [::1]), to the address they listen on (`--host`, unless it is a
wildcard such as 0.0.0.0) and to the names the user adds (`--allowed-host`, '*' for
any, '*.example.com' for a domain's names); others get 400 with a JSON `detail` (as
FastAPI's errors are) naming the Host received, the hosts answered and `--allowed-host`
(`HostGuard`). `--allowed-host` takes a name as a browser sends it: a URL or a port
given with it (`http://box.lan:8001/`) is reduced to the name. Anyone who can reach the
port can still send a request naming an allowed host: `--host 0.0.0.0` opens the page to
the network, and the check keeps other sites' pages out, not people.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from visiontune.errors import ConfigError, VisiontuneError

LOCAL = ("localhost", "127.0.0.1", "[::1]")
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def host_name(name: str) -> str:
    """A host as the Host header writes it, without a port: lower case, an IPv6 address in
    brackets ("[::1]:8001" and "::1" are "[::1]"; "box.lan:8001" is "box.lan")."""
    name = name.strip().lower()
    if _ipv6(name.strip("[]")):
        return f"[{name.strip('[]')}]"
    if name.startswith("["):  # [v6]:port
        return name[:name.find("]") + 1] if "]" in name else name
    return name.rsplit(":", 1)[0] if name.count(":") == 1 else name


def _ipv6(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).version == 6
    except ValueError:
        return False


def allowed_name(given: str) -> str:
    """An --allowed-host as the Host header will name it: the name of a URL (scheme, path
    and port left out), lower case; ConfigError for what no Host header can match."""
    name = given.strip()
    if name == "*":
        return name
    if "//" in name:
        name = urlsplit(name).netloc or ""
    elif "/" in name:
        name = name.split("/", 1)[0]
    name = host_name(name.rsplit("@", 1)[-1])
    body = name[2:] if name.startswith("*.") else name
    if not name or "*" in body or (name.startswith("*") and name != "*" and not name.startswith("*.")):
        raise ConfigError(f"--allowed-host {given!r}: give a name or address as a browser sends it (box.lan, "
                          "192.168.1.7, '*.example.com', or '*' for any)")
    return name


def allowed_hosts(host: str, extra: Sequence[str] = ()) -> list[str]:
    """The Host header values answered when listening on `host` with `extra` allowed
    (["*"]: any)."""
    added = [allowed_name(n) for n in extra]
    if "*" in added:
        return ["*"]
    names = [*LOCAL, *([] if host.strip() in WILDCARDS else [host_name(host)]), *added]
    return list(dict.fromkeys(n for n in names if n))


def page_url(host: str, port: int) -> str:
    """The address to open for a server listening on `host`: a wildcard (0.0.0.0, ::)
    listens on this machine too, whose own address answers; an IPv6 address in brackets."""
    if host.strip() in WILDCARDS:
        name = "[::1]" if _ipv6(host.strip().strip("[]")) else "127.0.0.1"
    else:
        name = host_name(host)
    return f"http://{name}:{port}/"


def reach_note(host: str, port: int, allowed: Sequence[str]) -> str:
    """What the start-up message says about who is answered: the hosts, and how another
    machine gets in."""
    line = f"answering requests addressed to {', '.join(allowed)}"
    if host.strip() in WILDCARDS and allowed != ["*"]:
        return (f"{line}; from another machine, open http://NAME:{port}/ after adding this machine's NAME (or "
                "address) with --allowed-host NAME")
    return f"{line} (--allowed-host NAME adds one)"


class HostGuard:
    """ASGI middleware: `app` for requests addressed to `allowed` (see the module
    docstring), a 400 naming the Host received and the hosts answered for others."""

    def __init__(self, app: Any, allowed: Sequence[str]) -> None:
        self.app, self.allowed = app, list(allowed)

    def allows(self, host: str) -> bool:
        return any(pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))
                   for pattern in self.allowed)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        received = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
        if received and self.allows(host_name(received)):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        detail = (f"this server answers requests addressed to {', '.join(self.allowed)}; this one was addressed "
                  f"to {received!r}. Open one of those, or start the server with --allowed-host NAME for the name "
                  "you use")
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def guard_hosts(app: Any, host: str, extra: Sequence[str] = ()) -> Any:
    """`app` behind the Host check (see the module docstring)."""
    return HostGuard(app, allowed_hosts(host, extra))


def serve_app(app: Any, host: str, port: int, extra: Sequence[str] = (), command: str = "serve") -> None:
    """Run `app` behind the Host check until Ctrl+C (uvicorn)."""
    try:
        import uvicorn
    except ImportError:
        raise VisiontuneError(f"{command} needs uvicorn: pip install 'visiontune[serve]'") from None
    uvicorn.run(guard_hosts(app, host, extra), host=host, port=port, log_level="warning")
