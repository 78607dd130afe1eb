"""STDG for the inversion (ALGORITHM.md §3): GT targets, the guidance gradient, and both window by window."""

from __future__ import annotations

import contextlib
from typing import Any

from stages.invert.passes import Passes
from stages.method.windows import Windows, weight_tensor


class STDG:
    """GT targets and the STDG gradient for one clip (batch 1, conditional branch, source prompt)."""

    def __init__(self, passes: Passes, controller: Any, masks: Any, c_src: Any,
                 coefficients: tuple[float, float, float, float]):
        from stages.method.control.record import stdg_layers

        self.passes = passes
        self.controller = controller
        self.masks = masks
        self.c_src = c_src
        self.coefficients = coefficients
        self.temporal, self.spatial = stdg_layers(controller.names)

    def _reducers(self, targets: Any | None) -> tuple[Any, Any]:
        from stages.method.guidance import gather_top1, masked_mean_keys, temporal_top1

        def on_keys(name: str, keys: Any) -> Any:
            return masked_mean_keys(keys, self.masks.tokens(keys.shape[1]))

        if targets is None:
            return (lambda name, probs: temporal_top1(probs)), on_keys
        return (lambda name, probs: gather_top1(probs, targets.temporal[name][1])), on_keys

    def targets(self, z_star: Any, t: int, need: tuple[bool, bool] = (True, True), truncate: bool = True) -> Any:
        """GT statistics from UNet(z*_t, t, c_src) without grad (stopped after the last needed layer)."""
        import torch

        from stages.method.control.record import Recorder, StopForward
        from stages.method.guidance import Targets

        on_t, on_k = self._reducers(None)
        rec = Recorder(self.controller, self.temporal, self.spatial, on_t if need[0] else None,
                       on_k if need[1] else None, stop_when_complete=truncate)
        with self.passes.phase("gt_forward"), torch.no_grad(), rec:
            try:
                self.passes.eps(z_star, t, self.c_src, gt=True)
            except StopForward:
                pass
        if not rec.complete:
            raise RuntimeError("the GT pass did not reach every STDG layer")
        return Targets(temporal={n: rec.results[n] for n in rec.temporal},
                       keys={n: rec.results[n] for n in rec.spatial})

    def gradient(self, z: Any, t: int, targets: Any, components: tuple[str, ...] = (), combined: bool = True,
                 cut: bool = True) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
        """One grad forward UNet(z, t, c_src): (G or None, eps_c, losses, {component: gradient}).

        G is the gradient of the coefficient-weighted sum (one backward); `components` names extra
        per-component gradients (one backward each).
        """
        import torch

        from stages.method.control.record import Recorder, cut_graph_after
        from stages.method.guidance import COMPONENTS, Generated, combine, stdg_losses

        zg = z.detach().clone().requires_grad_(True)
        on_t, on_k = self._reducers(targets)
        rec = Recorder(self.controller, list(targets.temporal), list(targets.keys),
                       on_t if targets.temporal else None, on_k if targets.keys else None)
        with torch.enable_grad():
            with self.passes.phase("stdg_forward"):
                with rec, (cut_graph_after(self.passes.models.unet) if cut else contextlib.nullcontext()):
                    out = self.passes.eps(zg, t, self.c_src)
                gen = Generated(temporal={n: rec.results[n] for n in rec.temporal},
                                keys={n: rec.results[n] for n in rec.spatial})
                losses = stdg_losses(gen, targets, self.masks)
                wanted = [combine(losses, self.coefficients)] if combined else []
                wanted += [losses[c] for c in components]
            grads = []
            with self.passes.phase("stdg_backward"):
                for k, loss in enumerate(wanted):
                    if loss.requires_grad:
                        grads.append(torch.autograd.grad(loss, zg, retain_graph=k < len(wanted) - 1,
                                                         allow_unused=True)[0])
                        self.passes.backwards += 1
                    else:
                        grads.append(None)
        grads = [torch.zeros_like(z) if g is None else g.detach().to(z.dtype) for g in grads]
        g_total = grads.pop(0) if combined else None
        comps = dict(zip(components, grads))
        assert set(comps) <= set(COMPONENTS)
        return g_total, out.detach(), {k: float(v.detach()) for k, v in losses.items()}, comps


def _windowed_stdg(stdgs: list[STDG], windows: Windows, z_star: Any, z_t: Any, t: int, need: tuple[bool, bool],
                   components: tuple[str, ...]) -> tuple[Any, Any, list[Any], dict[str, float], dict[str, Any]]:
    """STDG window by window: (G, eps_c, per-window targets, mean losses, components), G, eps_c and the
    components blended with the windows' weights (each window's loss is its own)."""
    import torch

    G, eps_c = torch.zeros_like(z_t), torch.zeros_like(z_t)
    comps = {n: torch.zeros_like(z_t) for n in components}
    targets, losses = [], {}
    for k, (stdg, (s, e)) in enumerate(zip(stdgs, windows.spans)):
        tg = stdg.targets(z_star[:, s:e], t, need)
        g, ec, ls, cp = stdg.gradient(z_t[:, s:e], t, tg, components)
        w = weight_tensor(windows, k, g)
        G[:, s:e] += w * g
        eps_c[:, s:e] += w * ec
        for n in components:
            comps[n][:, s:e] += w * cp[n]
        targets.append(tg)
        for n, v in ls.items():
            losses[n] = losses.get(n, 0.0) + v / len(windows.spans)
    return G, eps_c, targets, losses, comps
