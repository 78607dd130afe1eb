"""Stage `vd export`: composite a finished edit back into the source footage at the source's resolution,
frame rate, rotation, colour tags and audio (config, region, media, run; fresh for `is_current`).

The stage's interface: ExportConfig, validate, is_current, run_export."""

from stages.export.config import CODECS, ExportConfig, auto_feather, default_output, validate
from stages.export.fresh import is_current
from stages.export.run import pick_edit, run_export

__all__ = ["CODECS", "ExportConfig", "auto_feather", "default_output", "is_current", "pick_edit",
           "run_export", "validate"]
