"""`dsv2 serve`: the OpenAI-compatible HTTP server over the engine (the layer above dsv2.inference.engine).

    protocol.py     the API's request and response bodies (pydantic) and its error shape
    chat.py         a checkpoint's chat template, rendered as transformers renders it
    engine_loop.py  the engine's step loop on its own thread; admitted requests in, outputs out to the handlers
    metrics.py      Prometheus metrics
    http.py         the API key, the body limit, errors in OpenAI's shape, the event stream, the OpenAPI schema
    app.py          the Server: a method per endpoint, the FastAPI app they make (build_app)
    server.py       loading a checkpoint and running the app on uvicorn (SIGTERM drains)
"""
