"""sd-meebs: a reproducible trainer for Stable Diffusion 1.5 LyCORIS adapters."""

__version__ = "0.1.0"
