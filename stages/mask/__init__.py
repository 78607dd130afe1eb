"""Stage `vd mask`: clip -> workspace with frames and masks (run), prompts, named objects, text boxes,
previews; `is_current` (fresh) tells whether a workspace's masks answer a clip and settings."""

from stages.mask.fresh import is_current, mask_settings

__all__ = ["is_current", "mask_settings"]
