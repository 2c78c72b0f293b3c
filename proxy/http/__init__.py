"""The HTTP surface: the raw ASGI gateway (hot path), ops and admin routes, serving under uvicorn."""
