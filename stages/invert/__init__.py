"""Stage `vd invert`: DDIM inversion + null-text optimisation with STDG; other code imports from here.

Modules: config (InvertConfig, constants, resolve_config, validate), store (the workspace's inversion
group: Inversion, load_inversion, stored_settings, is_current), passes (counted UNet calls, PhaseTimer,
windows), stdg (STDG), nulltext (the null-text step), baseline (the reference-cost plain mode),
report (reconstruction and summary), direct (the direct and negative-prompt methods), run (run_invert).
"""

from stages.invert.config import (BASE_LR, CARRIED, DEFAULT_STDG, EARLY_STOP, EARLY_STOP_SLOPE, GROUP, METHODS,
                                  REGIONS, STAT_COLUMNS, InvertConfig, resolve_config, validate)
from stages.invert.passes import Passes, PhaseTimer, clip_windows
from stages.invert.run import run_invert
from stages.invert.stdg import STDG
from stages.invert.store import Inversion, is_current, load_inversion, stored_settings

__all__ = ["BASE_LR", "CARRIED", "DEFAULT_STDG", "EARLY_STOP", "EARLY_STOP_SLOPE", "GROUP", "METHODS", "REGIONS",
           "STAT_COLUMNS", "STDG", "Inversion", "InvertConfig", "Passes", "PhaseTimer", "clip_windows",
           "is_current", "load_inversion", "resolve_config", "run_invert", "stored_settings", "validate"]
