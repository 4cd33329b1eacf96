"""Which endpoint hosts the app's "Add stage" form may point a stage at.

A stage added in the app makes the app's machine send HTTP requests to its `api_base`. Whoever
can open the app could otherwise make it call any URL its machine can reach (an internal service,
a cloud metadata address). So the form accepts loopback hosts only (this machine: 127.0.0.0/8,
::1, localhost) unless the person running the app allows more before starting it:

    CASCADE_ALLOWED_API_HOSTS="api.openai.com,10.0.0.5" make run   # these hosts too
    CASCADE_ALLOWED_API_HOSTS="*" make run                          # any host (opt in, on purpose)

Presets written in files are not limited: whoever writes the file already runs the machine.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Mapping
from urllib.parse import urlsplit

ALLOWED_HOSTS_ENV = "CASCADE_ALLOWED_API_HOSTS"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_base_problem(api_base: str, env: Mapping[str, str] | None = None) -> str | None:
    """Why the app must not call `api_base` (one line), or None when its host is allowed."""
    env = os.environ if env is None else env
    try:
        parts = urlsplit(api_base.strip())
        host = (parts.hostname or "").lower()
    except ValueError as err:  # e.g. a malformed IPv6 literal
        return f"{api_base!r} is not a URL ({err})"
    if parts.scheme not in ("http", "https") or not host:
        return f"{api_base!r} must be an http:// or https:// URL with a host"
    allowed = {h.strip().lower() for h in env.get(ALLOWED_HOSTS_ENV, "").split(",") if h.strip()}
    if _is_loopback(host) or "*" in allowed or host in allowed:
        return None
    return (f"host {host!r} is not allowed: the app calls loopback endpoints only unless it was started with "
            f"{ALLOWED_HOSTS_ENV}={host} (comma-separated hosts, or * for any)")
