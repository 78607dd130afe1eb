"""The plain mode (`plain=True`, the benchmark baseline): it pays what the reference code pays.

Plain mode runs, at every step, 4 full GT + 4 full grad forwards + 4 backwards (one per STDG component), a
separate eps_c forward, a batch-2 final update, trainable UNet weights (weight gradients in every null-text
backward), explicit float32 attention maps in every layer, and gc.collect() (+ empty_cache on CUDA) after
every inner iteration and STDG component. The step itself is nulltext._step with cfg.plain set.
"""

from __future__ import annotations

import contextlib
from typing import Any

from stages.invert.passes import Passes


@contextlib.contextmanager
def _reference_costs(models: Any, controller: Any, plain: bool) -> Any:
    """Plain mode pays what the reference pays: trainable UNet weights (every null-text backward also
    computes and accumulates their gradients, ALGORITHM.md §4, §9.2 item 4) and explicit float32
    attention probabilities in every attention layer instead of fused SDPA (§8.4 item 8). The optimised
    mode runs a frozen UNet with SDPA. Both are undone afterwards (the models may be reused)."""
    from stages.method.control.controller import explicit_attention

    if not plain:
        models.unet.requires_grad_(False)
        yield
        return
    models.unet.requires_grad_(True)
    controller.fallback = explicit_attention
    try:
        yield
    finally:
        controller.fallback = None
        models.unet.requires_grad_(False)
        for p in models.unet.parameters():
            p.grad = None


def _flush(passes: Passes) -> None:
    """The reference's per-iteration gc.collect() (+ torch.cuda.empty_cache()); plain mode only."""
    import gc

    import torch

    with passes.phase("gc"):
        gc.collect()
        if passes.models.device.type == "cuda":
            torch.cuda.empty_cache()
