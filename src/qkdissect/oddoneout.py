"""Compatibility path: ``qkdissect.oddoneout`` is :mod:`qkdissect.synthetic.oddoneout` (odd-one-out images with exact
target/distractor masks in the O3 folder layout, and the O3 reader)."""

from qkdissect.synthetic.oddoneout import *  # noqa: F401,F403
from qkdissect.synthetic.oddoneout import __all__  # noqa: F401
