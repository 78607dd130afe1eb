"""Stage `vd edit`: VideoDirector editing from a finished inversion (run), its sampling loop, per-region
edits; `is_current` (fresh) tells whether a stored edit answers its settings and the current inversion."""

from stages.edit.fresh import is_current

__all__ = ["is_current"]
