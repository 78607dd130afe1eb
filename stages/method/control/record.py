"""Recording handlers for STDG: temporal attention probabilities and spatial self-attention keys.

Layers (ALGORITHM.md §2.2), found by name in the installed controller, never by count:
- temporal: "up_blocks.{1,2}.motion_modules.<k>.transformer_blocks.0.attn{1,2}"; the handler sees rows
  (B*H*W, heads, F, d), i.e. row b*HW + p with p row-major (AnimateDiffTransformer3D's "(b h w) f c").
- spatial: "up_blocks.{1,2}.attentions.<k>.transformer_blocks.0.attn1"; the handler rebuilds the to_k
  output before the head split, (B*F, HW, C).
A `Recorder` hands each layer's features to a reduce callback (run in float32 with autocast off) and keeps
only what it returns, so full maps never outlive their layer (autograd still keeps what backward needs).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from stages.method.control.controller import AttentionController

TEMPORAL_RE = re.compile(r"^up_blocks\.(\d+)\.motion_modules\.\d+\.transformer_blocks\.0\.attn[12]$")
SPATIAL_RE = re.compile(r"^up_blocks\.(\d+)\.attentions\.\d+\.transformer_blocks\.0\.attn1$")
STDG_BLOCKS = (1, 2)

TemporalFn = Callable[[str, torch.Tensor], Any]  # (name, probs (B*HW, heads, F, F) >= float32) -> kept value
KeyFn = Callable[[str, torch.Tensor], Any]  # (name, keys (B*F, HW, C)) -> kept value


class StopForward(Exception):
    """Raised by a recorder once every layer it needs has been recorded (truncated GT forward)."""


def stdg_layers(names: list[str], blocks: tuple[int, ...] = STDG_BLOCKS) -> tuple[list[str], list[str]]:
    """(temporal, spatial) STDG module names among `names`, in the given (execution) order."""
    temporal = [n for n in names if (m := TEMPORAL_RE.match(n)) and int(m.group(1)) in blocks]
    spatial = [n for n in names if (m := SPATIAL_RE.match(n)) and int(m.group(1)) in blocks]
    if not temporal or not spatial:
        raise ValueError(f"the UNet has no STDG layers in up_blocks {blocks} (is it a UNetMotionModel?)")
    return temporal, spatial


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class Recorder:
    """Context manager: installs recording handlers on `controller` for the given layers, removes them after.

    on_temporal / on_keys reduce a layer's probabilities / keys; their results land in `results[name]`.
    With `stop_when_complete`, the forward is aborted (StopForward) after the last needed layer, so a
    GT pass skips the rest of the decoder.
    """

    def __init__(self, controller: AttentionController, temporal: list[str], spatial: list[str],
                 on_temporal: TemporalFn | None, on_keys: KeyFn | None, stop_when_complete: bool = False):
        self.controller = controller
        self.temporal = list(temporal) if on_temporal is not None else []
        self.spatial = list(spatial) if on_keys is not None else []
        self.on_temporal = on_temporal
        self.on_keys = on_keys
        self.stop_when_complete = stop_when_complete
        self.results: dict[str, Any] = {}

    def __enter__(self) -> "Recorder":
        self.results = {}
        for name in self.temporal:
            self.controller.set(name, self._temporal)
        for name in self.spatial:
            self.controller.set(name, self._spatial)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in self.temporal + self.spatial:
            self.controller.set(name, None)

    @property
    def complete(self) -> bool:
        return len(self.results) == len(self.temporal) + len(self.spatial)

    def _keep(self, name: str, value: Any) -> None:
        if self.controller.recomputing:  # a checkpointed block's recomputation: recorded in its forward
            return
        self.results[name] = value
        if self.stop_when_complete and self.complete:
            raise StopForward(name)

    def _temporal(self, name: str, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 in gradient checks
        with _no_autocast(q.device):
            scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * (q.shape[-1] ** -0.5)
            probs = scores.softmax(dim=-1)
            kept = self.on_temporal(name, probs)  # type: ignore[misc]
        out = torch.matmul(probs.to(v.dtype), v)
        self._keep(name, kept)
        return out

    def _spatial(self, name: str, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        fallback = self.controller.fallback  # the baseline's explicit maps, else fused SDPA
        out = fallback(name, attn, q, k, v) if fallback is not None else F.scaled_dot_product_attention(q, k, v)
        b, heads, n, d = k.shape
        flat = k.transpose(1, 2).reshape(b, n, heads * d)
        with _no_autocast(q.device):
            kept = self.on_keys(name, flat)  # type: ignore[misc]
        self._keep(name, kept)
        return out


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def cut_graph_after(unet: torch.nn.Module, last_block: int = max(STDG_BLOCKS)) -> Iterator[None]:
    """Detach every input of the decoder blocks after up_blocks.<last_block> (hidden state, skips, temb).

    In the STDG grad forward nothing after the last STDG layer reaches the loss; detaching there keeps
    autograd from storing those activations (the highest-resolution ones) while the output stays exact.
    """
    hooks = [block.register_forward_pre_hook(lambda mod, args, kwargs: (_detach(args), _detach(kwargs)),
                                             with_kwargs=True)
             for i, block in enumerate(unet.up_blocks) if i > last_block]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
