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
