"""KV caches, the model runner, sampling and the generation loop."""
