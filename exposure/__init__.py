"""exposure: a real-time consolidated exposure monitor for a multi-manager fund."""

__version__ = "0.1.0"
