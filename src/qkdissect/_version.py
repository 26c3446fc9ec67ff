"""qkdissect's version: a leaf module, so that infrastructure can record it without importing the package."""

__version__ = "0.1.0"
