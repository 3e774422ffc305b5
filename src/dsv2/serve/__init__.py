"""`dsv2 serve`: the OpenAI-compatible HTTP server over the engine (the layer above dsv2.inference.engine).

    protocol.py     the API's request bodies (pydantic), the limits on them, and its error shape
    responses.py    the API's response bodies (pydantic)
    tokens.py       each token's text and bytes, the prompt-size bound, log-probabilities in OpenAI's shapes
    chat.py         a checkpoint's chat template, rendered as transformers renders it
    engine_loop.py  the engine's step loop on its own thread; admitted requests in, outputs out to the handlers
    metrics.py      Prometheus metrics
    http.py         the API key, the body, errors in OpenAI's shape and words, the event stream, the OpenAPI schema
    timeouts.py     read timeouts for a request's headers and body (uvicorn's h11 protocol, subclassed)
    app.py          the Server: a method per endpoint, the FastAPI app they make (build_app)
    server.py       loading a checkpoint and running the app on uvicorn (SIGTERM drains)
"""
