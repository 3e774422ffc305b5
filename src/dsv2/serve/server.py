"""Load a checkpoint into an engine and serve it on uvicorn until SIGTERM or Ctrl-C.

SIGTERM stops accepting connections, lets the requests in flight finish for up to `grace` seconds, stops the engine
loop, and returns (exit status 0): uvicorn re-raises the signal it caught once it has shut down, and the handler
installed here, which it restores first, takes it.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from ..errors import GenerationError
from ..inference.engine import Engine
from .app import ServerConfig, build_app
from .chat import ChatTemplate


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          api_key: str | None = None, max_model_len: int | None = None, max_queue: int = 256,
          grace: float = 30.0, log_level: str = "info", **engine_kw) -> int:
    _check_port(host, port)  # a port in use or a bad template fails before the weights load
    chat_template = ChatTemplate.from_checkpoint(model)
    try:
        engine = Engine.from_pretrained(model, max_model_len=max_model_len, **engine_kw)
    except GenerationError as e:
        raise ValueError(str(e).replace("max_model_len", "--max-model-len")) from None
    name = served_model_name or Path(model).resolve().name
    config = ServerConfig(name, engine.max_model_len, api_key, max_queue, root=str(Path(model).resolve()))
    app = build_app(engine, config, chat_template)
    s = engine.stats
    print(f"dsv2 serve: {name} on http://{host}:{port}/v1 ({s['num_blocks']} cache blocks of "
          f"{s['block_size']} tokens, {s['bytes_per_token']} bytes/token; chat template: "
          f"{'yes' if chat_template else 'none'}; API key: {'required' if api_key else 'none'})", file=sys.stderr,
          flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"dsv2 serve: warning: listening on {host} without --api-key: anyone who can reach this port can use "
              "the model", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=grace, access_log=False, lifespan="on"))
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # see the module docstring
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits 1 when it cannot start (it has logged why)
        if e.code:
            raise OSError(f"could not serve on {host}:{port} (see the log above)") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise OSError(f"could not listen on {host}:{port}")
    logging.getLogger("dsv2.serve").info("stopped")
    return 0


def _check_port(host: str, port: int) -> None:
    if not 0 <= port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address this machine has ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
