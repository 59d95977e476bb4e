"""HTTP service: embed, classify and search over HTTP, with a web page.

:func:`create_app` builds the FastAPI application around a Backbone (and a
:class:`cliplab.index.SearchIndex`); :func:`run` binds a socket and serves it with
uvicorn.  Concurrent requests are micro-batched into shared model calls
(:class:`MicroBatcher`).  Needs ``pip install 'cliplab[serve]'``.

Examples
--------
>>> import cliplab
>>> from cliplab.serve import ServeSettings, create_app, run               # doctest: +SKIP
>>> app = create_app(cliplab.load("shapes-tiny"), index="idx",
...                  settings=ServeSettings(api_key="s3cret"))               # doctest: +SKIP
>>> run(app, host="127.0.0.1", port=8000)                                   # doctest: +SKIP
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

from ..errors import UsageError
from .app import API_KEY_HEADER, ServeSettings, create_app
from .batching import MicroBatcher, Overloaded

logger = logging.getLogger("cliplab.serve")

__all__ = ["API_KEY_ENV", "API_KEY_HEADER", "MicroBatcher", "Overloaded", "ServeSettings", "bind", "check_auth",
           "create_app", "is_loopback", "run"]

API_KEY_ENV = "CLIPLAB_API_KEY"
"""Environment variable holding the API key when ``--api-key`` is not given."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_auth(host: str, api_key: str | None, no_auth: bool) -> str | None:
    """The API key to require, or ``None`` for an explicit ``no_auth`` on a loopback host.

    Parameters
    ----------
    host : str
        The address the service listens on.
    api_key : str or None
        The key given (``--api-key``); ``None`` falls back to ``$CLIPLAB_API_KEY``.
    no_auth : bool
        Serve without a key.

    Raises
    ------
    UsageError
        A key and ``no_auth`` both; ``no_auth`` on an address other people can reach; or
        neither a key nor ``no_auth``.
    """
    key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    if no_auth:
        if api_key is not None:
            raise UsageError("--no-auth and --api-key contradict each other; give one")
        if not is_loopback(host):
            raise UsageError(f"--no-auth is only allowed on a loopback host (127.0.0.1, ::1, localhost), "
                             f"not {host}: anyone who reaches it could use the service; set an API key instead")
        return None
    if key is None:
        raise UsageError(f"no API key: pass --api-key KEY or set {API_KEY_ENV} "
                         "(or --no-auth to serve without one on 127.0.0.1)")
    if not key.strip():
        raise UsageError("the API key is empty; give a non-empty key")
    return key


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port, read it from ``getsockname()``).

    Raises
    ------
    UsageError
        The address cannot be used (in use, not this machine's, a port out of range).
    """
    if not 0 <= int(port) <= 65535:
        raise UsageError(f"--port must be 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") \
            from None
    sock.set_inheritable(True)
    return sock


def run(app, *, host: str = "127.0.0.1", port: int = 8000, sock: socket.socket | None = None,
        log_level: str = "info", server_box: list | None = None) -> None:
    """Serve ``app`` with uvicorn until interrupted.

    Parameters
    ----------
    app : fastapi.FastAPI
        From :func:`create_app`.
    host, port : str, int
        Where to listen (ignored when ``sock`` is given).
    sock : socket.socket, optional
        A socket from :func:`bind`.
    log_level : str, default "info"
    server_box : list, optional
        The ``uvicorn.Server`` is appended to it (set its ``should_exit`` to stop it
        from another thread).

    Raises
    ------
    UsageError
        As :func:`bind`.
    """
    import uvicorn

    sock = sock or bind(host, port)
    config = uvicorn.Config(app, log_level=log_level, timeout_keep_alive=5, timeout_graceful_shutdown=10,
                            access_log=log_level == "debug")
    server = uvicorn.Server(config)
    if server_box is not None:
        server_box.append(server)
    host, port = sock.getsockname()[:2]
    logger.info("listening on http://%s:%d", host if ":" not in host else f"[{host}]", port)
    server.run(sockets=[sock])
