"""cliplens: semantic text-to-image search and evaluation with CLIP."""

__version__ = "0.1.0"
