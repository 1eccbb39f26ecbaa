"""Optimizers: the lecture's plain SGD, written out; AdamW comes from torch."""

from __future__ import annotations

import torch


class SGD(torch.optim.Optimizer):
    """Plain SGD, ``p <- p + (-lr * grad)``, exactly as the lecture writes it
    (``p.data += -lr * p.grad``); with ``weight_decay`` (L2, coupled, as
    ``torch.optim.SGD``'s), ``p <- p + (-lr * (grad + weight_decay * p))``.

    ``torch.optim.SGD`` computes ``p.add_(grad, alpha=-lr)``, a fused multiply-add that
    rounds once instead of twice; over 200,000 steps that one ulp is enough to change
    the printed losses, so plumb keeps the notebook's two roundings. ``lr`` lives in
    ``param_groups`` as usual, so torch's LR schedulers work.
    """

    def __init__(self, params, lr: float = 0.1, weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                # Two foreach calls for all parameters: -lr * grad, then p + that
                # (weight decay first adds weight_decay * p to the gradients: a copy).
                grads = [p.grad for p in params]
                if group.get("weight_decay", 0.0):
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                updates = torch._foreach_mul(grads, -group["lr"])
                torch._foreach_add_(params, updates)
        return loss
