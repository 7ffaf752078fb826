"""Extra CLI commands, one module each with ``register(app)``; ``tandem.cli`` loads them all."""
