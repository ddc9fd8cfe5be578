"""uzr: pour a large language model's attention habits into a small one at run time, and measure it."""

__version__ = "0.1.0"
