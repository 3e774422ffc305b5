"""Load a checkpoint into an engine and serve it on uvicorn until SIGTERM or Ctrl-C.

The connection's read timeouts (headers, body) are timeouts.py's, on uvicorn's h11 protocol; keep-alive is
uvicorn's.

SIGTERM stops accepting connections, lets the requests in flight finish for up to `grace` seconds, stops the engine
loop, and returns (exit status 0): uvicorn re-raises the signal it caught once it has shut down, and the handler
installed here, which it restores first, takes it.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from ..chat_template import ChatTemplate
from ..config import ModelConfig
from ..errors import GenerationError
from ..inference.engine import Engine, check_options
from ..lora import read_adapter
from .app import ServerConfig, build_app
from .timeouts import Timeouts, protocol

TIMEOUTS = Timeouts()
KEEP_ALIVE_S = 5
"""Seconds an idle connection is kept between requests (uvicorn's default)."""


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          api_key: str | None = None, max_model_len: int | None = None, max_queue: int = 256,
          grace: float = 30.0, log_level: str = "info", timeouts: Timeouts = TIMEOUTS,
          lora_modules: dict[str, str] | None = None, max_loras: int | None = None, max_lora_rank: int | None = None,
          enable_lora_loading: bool = False, **engine_kw) -> int:
    """timeouts: how long a client may take to send a request's headers and body (timeouts.py). lora_modules:
    adapter name -> folder, loaded at the start (more with POST /v1/load_lora_adapter, up to max_loras at once)."""
    _check_port(host, port)  # a port in use, a bad option or a bad template fails before the weights load
    engine_kw["max_model_len"] = max_model_len
    name = served_model_name or Path(model).resolve().name
    lora_modules = lora_modules or {}
    adapters = {n: read_adapter(p) for n, p in lora_modules.items()}  # a bad folder fails before the weights load
    if name in adapters:
        raise ValueError(f"--lora-modules: {name!r} is the base model's name")
    if max_loras is not None or adapters:
        engine_kw["max_loras"] = max_loras if max_loras is not None else max(1, len(adapters))
        engine_kw["max_lora_rank"] = max_lora_rank or max([a.rank for a in adapters.values()] or [16])
        if engine_kw["max_loras"] < len(adapters):
            raise ValueError(f"--max-loras {max_loras} is fewer than the {len(adapters)} --lora-modules")
    try:
        _check_options(model, max_queue, grace, engine_kw)
        chat_template = ChatTemplate.from_checkpoint(model)
        engine = Engine.from_pretrained(model, **engine_kw)
        for adapter_name, path in lora_modules.items():
            engine.add_adapter(adapter_name, path)
    except GenerationError as e:
        raise ValueError(_as_flags(str(e))) from None
    config = ServerConfig(name, engine.max_model_len, api_key, max_queue, root=Path(model).resolve().name,
                          lora_loading=bool(api_key) or enable_lora_loading)
    app = build_app(engine, config, chat_template)
    s = engine.stats
    print(f"dsv2 serve: {name} on http://{host}:{port}/v1 ({s['num_blocks']} cache blocks of "
          f"{s['block_size']} tokens, {s['bytes_per_token']} bytes/token; chat template: "
          f"{'yes' if chat_template else 'none'}; API key: {'required' if api_key else 'none'}"
          + (f"; LoRA adapters: {', '.join(lora_modules) or 'none yet'} (at most {engine.adapters.max_loras}, rank "
             f"{engine.adapters.max_rank})" if engine.adapters is not None else "") + ")", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"dsv2 serve: warning: listening on {host} without --api-key: anyone who can reach this port can use "
              "the model", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol(timeouts),
                                           timeout_graceful_shutdown=grace, access_log=False, lifespan="on",
                                           timeout_keep_alive=KEEP_ALIVE_S))
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


ENGINE_OPTIONS = ("cache_memory", "num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens",
                  "max_model_len")
"""The engine's options that its check_options takes (and `dsv2 serve` has as flags)."""


def _check_options(model: str, max_queue: int, grace: float, engine_kw: dict) -> None:
    """The server's and the engine's options, against the checkpoint's config.json alone (no weights loaded yet;
    a checkpoint without one is from_pretrained's error to report)."""
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
        raise GenerationError(f"max_queue must be >= 1, got {max_queue}")
    if not isinstance(grace, int | float) or not math.isfinite(grace) or grace < 0:
        raise GenerationError(f"grace must be a number of seconds >= 0, got {grace}")
    config_file = Path(model) / "config.json"
    if config_file.is_file():
        check_options(ModelConfig.from_json(config_file), **{k: engine_kw[k] for k in ENGINE_OPTIONS
                                                             if engine_kw.get(k) is not None})


def _as_flags(message: str) -> str:
    """An option's name in a message as its `dsv2 serve` flag (max_model_len -> --max-model-len)."""
    for name in (*ENGINE_OPTIONS, "max_queue", "grace"):
        message = re.sub(rf"\b{name}\b", "--" + name.replace("_", "-"), message)
    return message


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
