"""qkdissect: singular modes of query-key interaction in transformers, and how singular modes are learned.

    >>> import qkdissect
    >>> loaded = qkdissect.load_model("timm:vit_base_patch16_224")   # or a folder, builtin:..., hf:...
    >>> atlas = qkdissect.dissect(loaded)                             # ModeAtlas
    >>> head = atlas.head(3, 5)                                       # .U .S .V .key_bias .cosines .weighted_cosine
    >>> atlas.save("atlas/")
    >>> qkdissect.compare([atlas, "other_atlas/"]).save("cmp/")          # several models over relative depth
    >>> qkdissect.survey(["timm:vit_base_patch16_224.dino", "timm:deit_base_patch16_224.fb_in1k"], "survey/")
"""

from qkdissect import builtin as _builtin  # noqa: F401  (registers builtin:oddvit and builtin:minilm)
from qkdissect._version import __version__
from qkdissect.adapters import AttentionLayer, LoadedModel, ModelAdapter, Preprocessing, get_adapter, load_model
from qkdissect.comparison import Comparison, compare, load_compare
from qkdissect.decomposition import HeadModes, ModeAtlas, dissect
from qkdissect.errors import QKDissectError
from qkdissect.factored import factored_svd
from qkdissect.metrics import NullReference, gaussian_null
from qkdissect.model_survey import survey

__all__ = [
    "AttentionLayer",
    "Comparison",
    "HeadModes",
    "LoadedModel",
    "ModeAtlas",
    "ModelAdapter",
    "NullReference",
    "Preprocessing",
    "QKDissectError",
    "__version__",
    "compare",
    "dissect",
    "factored_svd",
    "gaussian_null",
    "get_adapter",
    "load_compare",
    "load_model",
    "survey",
]
