"""Gradient checkpointing of the passes that backpropagate (STDG grad pass, null-text inner loop).

`--checkpointing blocks` recomputes every UNet down/mid/up block (its spatial and motion layers) in the
backward instead of keeping its activations; `layers` recomputes each layer inside the blocks (every
resnet, spatial transformer, motion module and resampler) on its own, so the backward holds one layer's
activations at a time instead of one block's. Both use torch.utils.checkpoint, non-reentrant, only where
grad is enabled (no-grad passes are untouched), and both recompute the forward once. The recomputation
runs with the attention handlers the unit had in its forward (the STDG recorders are uninstalled before
the backward), with `controller.recomputing` set so the recorders compute what the graph needs but record
nothing: each layer is recorded once. Results equal `off` to float rounding; only time and memory change,
so the mode is not a stored setting (changing it needs no --restart) and is kept in the inversion's attrs.

`auto` (the default) picks the first level of memory.LEVELS (off, blocks, layers: cheapest in time first)
whose predicted peak of the grad passes for this clip, size and window (stages.models.memory) fits the
device's free memory, and `layers` when none does; on the CPU, and where the memory model has no
prediction, it stays off.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

from stages.models import memory
from stages.models.oom import UNMODELLED, MemoryPlan, device_memory, gib

MODES = (*memory.LEVELS, "auto")
# the UNet block children recomputed one by one at the `layers` level
LAYER_LISTS = ("resnets", "attentions", "motion_modules", "downsamplers", "upsamplers")


@dataclass
class Choice:
    """The checkpointing mode a run uses and why (stored in the inversion's attrs)."""

    requested: str  # off | blocks | layers | auto
    mode: str  # off | blocks | layers
    reason: str
    need: int | None = None  # predicted peak of the grad passes without checkpointing (bytes)
    available: int | None = None  # the device's free memory at the decision (bytes)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def attrs(self) -> dict[str, Any]:
        return asdict(self)


def check_mode(mode: str) -> str:
    """The mode, or ValueError naming the choices."""
    if mode not in MODES:
        raise ValueError(f"--checkpointing must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def grad_peak(plan: MemoryPlan, level: str) -> int | None:
    """Predicted peak bytes of the heavier grad pass (STDG or null text) for `plan` at checkpointing `level`,
    None when not modelled."""
    if plan.model in UNMODELLED:
        return None
    if not plan.grad_passes:
        return 0  # nothing backpropagates (direct inversion, negative prompt without STDG)
    try:
        rows = memory.predict_passes(plan.grad_passes, plan.frames, plan.height, plan.width, plan.dtype,
                                     plan.window, plan.device or "cuda")
    except ValueError:
        return None
    return max(row[level] for row in rows.values())


def choose(requested: str, plan: MemoryPlan, available: int | None = None) -> Choice:
    """Resolve `requested` for a run described by `plan` (plan.device "cpu" or "cuda[:N]").

    available: the device's free bytes (default: asked from the device when it is a GPU).
    """
    check_mode(requested)
    if requested != "auto":
        return Choice(requested, requested, f"--checkpointing {requested}")
    if not plan.device.startswith("cuda"):
        return Choice(requested, "off", "auto: off on the CPU")
    if not plan.grad_passes:
        return Choice(requested, "off", "auto: off (nothing backpropagates in this inversion)")
    need = grad_peak(plan, "off")
    if need is None:
        return Choice(requested, "off", f"auto: off (no memory prediction for --model {plan.model or '?'} "
                                        f"in {plan.dtype})")
    if available is None:
        available = device_memory(plan.device).get("available")
    if available is None:
        return Choice(requested, "off", "auto: off (the device's free memory is unknown)", need)
    if need <= available:
        return Choice(requested, "off", f"auto: predicted {gib(need)} fits {gib(available)} free", need, available)
    for level in memory.LEVELS[1:]:
        peak = grad_peak(plan, level)
        if peak is not None and peak <= available:
            return Choice(requested, level, f"auto: predicted {gib(need)} > {gib(available)} free; "
                                            f"{level} {gib(peak)} fits", need, available)
    level = memory.LEVELS[-1]
    return Choice(requested, level, f"auto: predicted {gib(need)} > {gib(available)} free, and "
                                    f"{gib(grad_peak(plan, level) or 0)} even with {level}", need, available)


def unet_blocks(unet: Any) -> list[Any]:
    """The UNet's down, mid and up blocks, in execution order."""
    blocks = [*unet.down_blocks]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(unet.mid_block)
    return blocks + [*unet.up_blocks]


def unet_layers(unet: Any) -> list[Any]:
    """The layers inside the UNet's blocks: of each block, its resnets, spatial transformers, motion modules
    and resamplers (LAYER_LISTS)."""
    return [layer for block in unet_blocks(unet) for name in LAYER_LISTS
            for layer in (getattr(block, name, None) or [])]


def units(unet: Any, level: str) -> list[Any]:
    """The modules recomputed one by one at checkpointing `level` (none at off)."""
    check_mode(level)
    if level == "auto":
        raise ValueError("resolve --checkpointing auto with choose() first")
    return {"off": lambda u: [], "blocks": unet_blocks, "layers": unet_layers}[level](unet)


class _Recompute:
    """Context of a block's recomputation: the handlers (and fallback) it ran with, `recomputing` set."""

    def __init__(self, controller: Any, handlers: dict[str, Any], fallback: Any):
        self.controller, self.handlers, self.fallback = controller, handlers, fallback
        self._saved: tuple[Any, Any, bool] | None = None

    def __enter__(self) -> None:
        c = self.controller
        self._saved = (c.handlers, c.fallback, c.recomputing)
        c.handlers, c.fallback, c.recomputing = dict(self.handlers), self.fallback, True

    def __exit__(self, *exc: Any) -> None:
        assert self._saved is not None
        self.controller.handlers, self.controller.fallback, self.controller.recomputing = self._saved


def _checkpointed(forward: Callable[..., Any], controller: Any) -> Callable[..., Any]:
    import torch
    from torch.utils.checkpoint import checkpoint

    def contexts() -> tuple[Any, Any]:
        if controller is None:
            return contextlib.nullcontext(), contextlib.nullcontext()
        # called in the forward: the recomputation gets the handlers installed now
        return contextlib.nullcontext(), _Recompute(controller, dict(controller.handlers), controller.fallback)

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    run.vd_checkpointed = True  # type: ignore[attr-defined]
    return run


@contextlib.contextmanager
def checkpointed(unet: Any, controller: Any = None, level: str = "blocks") -> Iterator[int]:
    """Recompute the units of `level` (blocks or layers) of `unet` in the backward while the block is open
    (yields how many modules are wrapped; 0 at off). `controller`: the installed AttentionController, whose
    handlers each unit's recomputation reuses. Undone afterwards (the models may be reused)."""
    modules = units(unet, level)
    if controller is not None and not hasattr(controller, "recomputing"):
        controller.recomputing = False
    wrapped = []
    try:
        for module in modules:
            if getattr(module.forward, "vd_checkpointed", False):
                continue  # already wrapped by an enclosing call
            module.forward = _checkpointed(module.forward, controller)
            wrapped.append(module)
        yield len(modules)
    finally:
        for module in wrapped:
            del module.forward  # back to the class's forward


def grad_passes(cfg: Any) -> tuple[str, ...]:
    """The passes of this inversion that backpropagate: direct inversion has none, negative-prompt no null
    text, --no-stdg no STDG gradient (store_components computes it anyway)."""
    stdg = (any(cfg.coefficients()) or cfg.store_components) and cfg.method != "direct"
    null = cfg.method == "null-text" and int(cfg.null_steps) > 0
    return (("stdg",) if stdg else ()) + (("null_text",) if null else ())


def invert_plan(cfg: Any, frames: int, height: int, width: int, device: str, dtype: str) -> MemoryPlan:
    """The inversion's MemoryPlan (dtype a canonical name: fp32 on the CPU, the compute dtype on a GPU)."""
    return MemoryPlan("invert", int(frames), int(height), int(width), dtype, int(cfg.window), "off",
                      str(cfg.model), device, grad_passes(cfg))


def models_dtype(models: Any) -> str:
    """The memory model's dtype for loaded models: fp32 on the CPU (the UNet runs in float32 there)."""
    if models.device.type != "cuda":
        return "fp32"
    return memory.canonical_dtype(str(models.dtype))


@contextlib.contextmanager
def applied(ws: Any, group: str, cfg: Any, models: Any, controller: Any, frames: int, height: int,
            width: int) -> Iterator[Choice]:
    """Decide cfg.checkpointing for this run, record the choice in `group`'s attrs (`checkpointing`), and
    checkpoint the UNet at the chosen level while the block is open."""
    plan = invert_plan(cfg, frames, height, width, str(models.device), models_dtype(models))
    choice = choose(str(cfg.checkpointing), plan)
    ws.update_attrs(group, checkpointing=choice.attrs())
    with checkpointed(models.unet, controller, choice.mode):
        yield choice
