"""Keep third-party chatter (library log lines, advice, their progress bars, Python warnings) off the terminal.

vd's own lines go through stages.common.progress; what libraries print is noise to a user and breaks `-q`.
`VD_DEBUG=1` leaves everything as the libraries want it, for debugging.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LIBRARIES = ("diffusers", "transformers", "huggingface_hub", "accelerate", "sam2", "timm", "open_clip", "torch",
             "urllib3", "httpx", "filelock", "PIL", "matplotlib")
# Read by the libraries when they are first imported.
_ENV = {"TRANSFORMERS_VERBOSITY": "critical", "DIFFUSERS_VERBOSITY": "critical", "HF_HUB_VERBOSITY": "critical",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "TQDM_DISABLE": "1"}


def debugging() -> bool:
    """True when VD_DEBUG asks for tracebacks and library output."""
    return os.environ.get("VD_DEBUG", "") not in ("", "0")


def silence_libraries() -> None:
    """Silence library loggers, progress bars and warnings for this process (no-op with VD_DEBUG)."""
    if debugging():
        return
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    warnings.simplefilter("ignore")
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.CRITICAL + 1)
        logger.propagate = False
    # Libraries already imported have read their environment; tell them directly.
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity(logging.CRITICAL + 1)
        dlogging.disable_progress_bar()
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlogging

        tlogging.set_verbosity(logging.CRITICAL + 1)
        tlogging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
