"""Built-in model shape presets (real `config.json` files, no weights) for `rules check` and benchmarks."""
