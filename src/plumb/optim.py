"""Optimizers: the lecture's plain SGD, written out (AdamW comes from torch), and the
weights' running average (SWA)."""

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


class WeightAverage:
    """Stochastic weight averaging (Izmailov et al., 2018, "Averaging Weights Leads to
    Wider Optima and Better Generalization"): from step ``start`` on, every ``every``
    steps, the running mean of each parameter over the iterates taken so far,

        a_n = a_{n-1} + (p - a_{n-1}) / n        (a_1 = p),

    an equal-weight average of the SGD iterates, which wander around a minimum at a
    constant lr; their mean sits nearer its centre than any one of them. The mean lives
    in the optimizer's state (``state[p]["average"]``, the count in
    ``state[p]["averaged"]``), so a checkpoint carries it and a resumed run continues it
    bit for bit. ``apply()`` puts the mean into the parameters in place; the
    BatchNorm running statistics belong to the iterates, not to the mean, and must be
    recomputed after it (``train.calibrate_batchnorm``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, start: int, every: int):
        if start < 0 or every < 1:
            raise ValueError(f"start must be >= 0 and every >= 1, got {start}, {every}")
        self.optimizer, self.start, self.every = optimizer, start, every
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    @property
    def count(self) -> int:
        """How many iterates the mean holds (0: none yet)."""
        st = self.optimizer.state.get(self.params[0], {}) if self.params else {}
        return int(st.get("averaged", 0))

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        """After step ``step``'s update: fold the parameters into the mean when due."""
        if step < self.start or (step - self.start) % self.every:
            return
        for p in self.params:
            st = self.optimizer.state[p]
            n = int(st.get("averaged", 0)) + 1
            if n == 1:
                st["average"] = p.detach().clone()
            else:
                st["average"].add_((p.detach() - st["average"]) / n)
            st["averaged"] = n

    @torch.no_grad()
    def apply(self) -> int:
        """Copy the mean into the parameters (the optimizer's, in place); the number of
        iterates averaged (0: nothing was copied)."""
        n = self.count
        if n:
            for p in self.params:
                p.copy_(self.optimizer.state[p]["average"])
        return n
