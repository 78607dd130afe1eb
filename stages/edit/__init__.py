"""Stage `vd edit`: VideoDirector editing from a finished inversion (run), its sampling loop, per-region
edits, first-frame edits, direct-inversion offsets; `is_current` (fresh) tells whether a stored edit answers
its settings and the current inversion.

The stage's interface: EditConfig, validate_edit (validate), is_current, run_edits / run_edit."""

from stages.edit.fresh import is_current
from stages.edit.run import EditConfig, plan_edit, run_edit, run_edits, validate_edit

__all__ = ["EditConfig", "is_current", "plan_edit", "run_edit", "run_edits", "validate_edit"]
