"""merv's version: one place, read by ``merv --version``, the package (``merv.__version__``) and pyproject.toml."""

__version__ = "0.1.0"
