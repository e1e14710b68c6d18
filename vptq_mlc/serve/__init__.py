"""`vptq-mlc serve`: an OpenAI-compatible HTTP server with continuous batching over the engine's paged KV cache.

`worker.py` (the one engine loop), `app.py` (FastAPI routes), `protocol.py` (request schemas and response
bodies), `metrics.py` (Prometheus text), `server.py` (engine loading, uvicorn). Needs the `serve` extra
(fastapi, uvicorn); the runtime itself does not.
"""
