"""Matplotlib figures of the dynamics experiments: :mod:`.linear` (deep linear networks) and
:mod:`.incontext` (learners, meta-learners, in-context transformers); :mod:`.common` holds the shared pieces."""
