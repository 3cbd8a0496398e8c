"""Custom torch.compile backends (speed.compile_backend=tests.speed_backends:NAME) that fail on purpose: how the
tests make the speed layer's start-up check fall back on a CPU, in the trainer's own process."""

import torch


def raising(gm, example_inputs):
    """Compilation that fails, as a broken inductor or a missing compiler does."""
    raise RuntimeError("injected compile failure\n(a second line the warning leaves out)")


def off_by_ten_percent(gm, example_inputs):
    """Compilation that succeeds but computes outputs 10% too large: a numerics check must catch it."""

    def run(*args):
        out = gm(*args)
        scale = [o * 1.1 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out]
        return type(out)(scale) if isinstance(out, (list, tuple)) else scale

    return run


# Fused Adam that fails (GOLF_FUSED_ADAM_CLASS=tests.speed_backends:NAME, read by fused_adam_class in
# golf_dist/training/speed_check.py): built with fused=True like torch's, its step raises or moves the weights 10%
# too far


class RaisingFusedAdam(torch.optim.Adam):
    """A fused step that fails, as the fused kernel does on a device or dtype it does not support."""

    def step(self, closure=None):
        raise RuntimeError("injected fused Adam failure\n(a second line the warning leaves out)")


class TenPercentFusedAdam(torch.optim.Adam):
    """A fused step that runs but takes steps 10% larger than Adam's: a numerics check must catch it."""

    def step(self, closure=None):
        for group in self.param_groups:
            group["lr"] *= 1.1
        try:
            return super().step(closure)
        finally:
            for group in self.param_groups:
                group["lr"] /= 1.1
