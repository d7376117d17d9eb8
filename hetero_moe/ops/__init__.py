"""The modules that rules place (ops) and their registry."""
