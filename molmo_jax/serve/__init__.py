"""Serving a model directory: an OpenAI-compatible HTTP API with batched, streamed generation and
a web page that draws where Molmo points.

  python -m molmo_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000]

Modules: `protocol` (request schema, error body), `inputs` (messages and images -> conversation),
`backend` (examples and step-wise decoding on a Predictor's model), `engine` (queue and dynamic
batching), `app` (FastAPI routes), `page.html` (the page). Needs the `serve` extra.
"""
