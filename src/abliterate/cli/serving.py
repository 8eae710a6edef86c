"""`abliterate serve`'s socket and server: bound before the model loads, so a port in use is told at once."""

from __future__ import annotations

import errno
import socket

import click

from abliterate.errors import UserError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line saying why not."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=2048)
    except socket.gaierror:
        raise UserError(f"cannot listen on {host}: no such address here; use 127.0.0.1 (this machine only) or "
                        "0.0.0.0 (every interface)") from None
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} is in use; choose another with --port") from None
        if error.errno == errno.EACCES:
            raise UserError(f"no permission to listen on port {port}; choose one above 1023 with --port") from None
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def server_modules():
    """uvicorn and the app factory, or one line naming the extra to install."""
    try:
        import uvicorn

        from abliterate.use.serve import create_app
    except ImportError as error:
        raise UserError(f"abliterate serve needs the serve extra ({error.name} is missing): "
                        "pip install 'abliterate[serve]'") from None
    return uvicorn, create_app


def serve_on(listening: socket.socket, app, uvicorn, name: str, host: str, port: int, api_key: str | None) -> None:
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {name} on http://{shown}:{port}: OpenAI API at /v1, Ollama API at /api"
               + (", API key required" if api_key else "") + "; Ctrl-C stops")
    uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[listening])
