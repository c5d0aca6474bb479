"""The ``glrnet`` command: a thin layer over the library (train, evaluate, datasets, reproduce, certify,
robustness). ``options`` builds the flags, ``commands`` runs them, ``main`` parses and reports errors."""

from .main import build_parser, given_options, load_plugins, main

__all__ = ["build_parser", "given_options", "load_plugins", "main"]
