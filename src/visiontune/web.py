"""What visiontune's local web apps (`serve`, the `review` pages) share: which requests
they answer.

A page on localhost can be reached by any web site the user visits, through DNS
rebinding (a name of the attacker's that resolves to 127.0.0.1): the browser then sends
that name in the Host header. So the apps answer only requests addressed to this machine
(localhost, 127.0.0.1, [::1]), to the address they listen on (`--host`, unless it is a
wildcard such as 0.0.0.0) and to the names the user adds (`--allowed-host`, '*' for
any); others get 400 (Starlette's TrustedHostMiddleware). Anyone who can reach the port
can still send a request naming an allowed host: `--host 0.0.0.0` opens the page to the
network, and the check keeps other sites' pages out, not people.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from visiontune.errors import ConfigError, VisiontuneError

LOCAL = ("localhost", "127.0.0.1", "[::1]")
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def host_name(name: str) -> str:
    """A host as the Host header writes it: lower case, an IPv6 address in brackets."""
    name = name.strip().lower()
    try:
        if ipaddress.ip_address(name.strip("[]")).version == 6:
            return f"[{name.strip('[]')}]"
    except ValueError:
        pass
    return name


def allowed_hosts(host: str, extra: Sequence[str] = ()) -> list[str]:
    """The Host header values answered when listening on `host` with `extra` allowed
    (["*"]: any)."""
    for name in (n.strip() for n in extra):
        if "*" in name[1:] or (name.startswith("*") and name != "*" and not name.startswith("*.")):
            raise ConfigError(f"--allowed-host {name!r}: give a name or address, '*.example.com' or '*'")
    names = [*LOCAL, *([] if host.strip() in WILDCARDS else [host]), *extra]
    if any(n.strip() == "*" for n in names):
        return ["*"]
    return list(dict.fromkeys(host_name(n) for n in names if n.strip()))


def guard_hosts(app: Any, host: str, extra: Sequence[str] = ()) -> Any:
    """`app` behind the Host check (see the module docstring)."""
    try:
        from starlette.middleware.trustedhost import TrustedHostMiddleware
    except ImportError:
        raise VisiontuneError("the web pages need fastapi: pip install 'visiontune[serve]'") from None
    return TrustedHostMiddleware(app, allowed_hosts=allowed_hosts(host, extra), www_redirect=False)


def serve_app(app: Any, host: str, port: int, extra: Sequence[str] = (), command: str = "serve") -> None:
    """Run `app` behind the Host check until Ctrl+C (uvicorn)."""
    try:
        import uvicorn
    except ImportError:
        raise VisiontuneError(f"{command} needs uvicorn: pip install 'visiontune[serve]'") from None
    uvicorn.run(guard_hosts(app, host, extra), host=host, port=port, log_level="warning")
