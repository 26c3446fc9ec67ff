"""qkdissect: singular modes of query-key interaction in transformers, and how singular modes are learned."""

from qkdissect.errors import QKDissectError

__version__ = "0.1.0"

__all__ = ["QKDissectError", "__version__"]
