"""merv: MERV (multi-encoder video LLMs) as a reproducible Snakemake + DVC pipeline.

``from merv import load_vid`` is the entry point for inference; the heavy imports happen on first use.
"""

from merv.version import __version__

__all__ = ["__version__", "load_vid"]


def load_vid(path_or_name):
    """Load a trained MERV model from a checkpoint folder (see :func:`merv.api.load_vid`)."""
    from merv.api import load_vid as _load_vid

    return _load_vid(path_or_name)
