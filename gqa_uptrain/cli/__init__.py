"""Command-line entry points: one module per command (``gqa-convert``, ``gqa-uptrain``, ...)."""
