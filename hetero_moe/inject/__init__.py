"""Placement rules and the injector that applies them."""
