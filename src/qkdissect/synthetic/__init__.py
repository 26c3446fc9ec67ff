"""Synthetic images with exact masks: the procedural world the embedded model was trained on (``world``,
``scenes``) and odd-one-out images in the O3 folder layout (``oddoneout``)."""
