"""Command-line commands, one module per job; each module has ``register(app)``."""
