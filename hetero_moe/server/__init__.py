"""The OpenAI-compatible HTTP server: schemas, the engine worker, the FastAPI app."""
