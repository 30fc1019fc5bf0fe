"""LongGRIT: GRIT-20M regions annotated by a chain of vision-language models, and PixCLIP training."""

__version__ = "0.1.0"
