"""Stage `vd mask`: clip -> workspace with frames and masks (run), prompts, named objects, text boxes,
previews; `is_current` (fresh) tells whether a workspace's masks answer a clip and settings.

The stage's interface: MaskConfig, check_options (validate), is_current, run_mask."""

from stages.mask.fresh import is_current, mask_settings
from stages.mask.run import MaskConfig, check_options, parse_frames, run_mask

__all__ = ["MaskConfig", "check_options", "is_current", "mask_settings", "parse_frames", "run_mask"]
