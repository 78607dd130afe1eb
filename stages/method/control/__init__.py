"""Attention control: one controller per UNet, processors keyed by module name (see controller.py)."""

from stages.method.control.controller import AttentionController, Handler, install, module_kind

__all__ = ["AttentionController", "Handler", "install", "module_kind"]
