"""One shared controller that decides, per attention module name and step, what attention computes.

`install(unet, controller)` puts a `ControlledProcessor` on every attention module. The processor does
the projections exactly like diffusers' AttnProcessor2_0 and then asks the controller for a handler
registered under its module name. A handler gets (name, attn, q, k, v) in head layout (B, heads, N, d)
and returns the attention output in the same layout; with no handler, fused SDPA runs (no probability
maps are materialised). Handlers read the current step from `controller.step`, never from call counters.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

Handler = Callable[[str, Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def module_kind(name: str) -> str:
    """'temporal' (motion-module attention), 'self' (spatial attn1) or 'cross' (spatial attn2)."""
    if ".motion_modules." in name or name.startswith("motion_modules."):
        return "temporal"
    if name.endswith("attn1"):
        return "self"
    if name.endswith("attn2"):
        return "cross"
    return "other"


class AttentionController:
    """Holds the step index and the handlers for the current UNet call."""

    def __init__(self) -> None:
        self.step: int = 0
        self.handlers: dict[str, Handler] = {}
        self.names: list[str] = []  # every controlled module, in installation order
        # handler for modules without one of their own (None: fused SDPA); the benchmark baseline sets
        # explicit_attention here to pay the reference's cost of materialised probability maps
        self.fallback: Optional[Handler] = None
        # set while a checkpointed UNet block recomputes its forward in the backward (stages/invert/
        # checkpointing.py): handlers compute as before, recorders keep nothing (each layer recorded once)
        self.recomputing: bool = False

    def set(self, name: str, handler: Optional[Handler]) -> None:
        """Register (or with None remove) the handler for module `name`."""
        if handler is None:
            self.handlers.pop(name, None)
        else:
            self.handlers[name] = handler

    def clear(self) -> None:
        """Remove every handler: all modules run plain fused attention."""
        self.handlers.clear()

    def modules(self, kind: str) -> list[str]:
        """Names of the controlled modules of a kind ('temporal', 'self', 'cross')."""
        return [n for n in self.names if module_kind(n) == kind]


class ControlledProcessor:
    """AttnProcessor2_0 semantics with the attention core delegated to the controller."""

    def __init__(self, name: str, controller: AttentionController):
        self.name = name
        self.controller = controller

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        handler = self.controller.handlers.get(self.name) or self.controller.fallback
        if handler is None or attention_mask is not None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        else:
            out = handler(self.name, attn, query, key, value)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install(unet: torch.nn.Module, controller: AttentionController) -> AttentionController:
    """Put a controlled processor on every attention module of `unet` (idempotent)."""
    names = [key[: -len(".processor")] for key in unet.attn_processors]
    unet.set_attn_processor({f"{n}.processor": ControlledProcessor(n, controller) for n in names})
    controller.names = names
    return controller


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) over keys, computed in float32 for stability, returned in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return scores.softmax(dim=-1).to(q.dtype)


def explicit_attention(name: str, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A handler computing attention through explicit float32 probability maps (no fused kernel, autocast
    off): what the reference pays in every layer; the same result as SDPA up to rounding."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        return torch.matmul(attention_probs(q.float(), k.float()), v.float()).to(v.dtype)
