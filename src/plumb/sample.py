"""Sampling names from a trained model, makemore style, many at once.

Each sample starts from an all-boundary context; at every step
``p = softmax(logits / temperature)``, restricted to the ``top_k`` most likely tokens
when given, and the next token is drawn with ``torch.multinomial``; a sample ends at
the boundary token.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from plumb.data import Vocab
from plumb.errors import PlumbError


@torch.no_grad()
def sample(
    model: nn.Module,
    vocab: Vocab,
    block_size: int,
    n: int = 20,
    *,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    max_len: int = 100,
    device: str | torch.device = "cpu",
) -> list[str]:
    """Draw ``n`` items; the model is put in eval mode (running BatchNorm statistics)."""
    if n < 1:
        raise PlumbError(f"-n must be >= 1, got {n}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise PlumbError(f"--temperature must be a finite number > 0, got {temperature}")
    if top_k is not None and not top_k >= 1:
        raise PlumbError(f"--top-k must be >= 1, got {top_k}")
    if max_len < 1:
        raise PlumbError(f"--max-len must be >= 1, got {max_len}")
    was_training = model.training
    model.eval()
    context = torch.zeros((n, block_size), dtype=torch.long)
    out = torch.zeros((n, max_len), dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for t in range(max_len):
        logits = model(context.to(device)).float().cpu() / temperature
        if top_k is not None and top_k < logits.shape[1]:
            kth = torch.topk(logits, top_k, dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=1)
        ix = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        ix = ix.masked_fill(done, 0)
        out[:, t] = ix
        done |= ix == 0
        context = torch.cat([context[:, 1:], ix[:, None]], dim=1)
        if done.all():
            break
    model.train(was_training)
    samples = []
    for row in out.tolist():
        ids = row[: row.index(0)] if 0 in row else row
        samples.append(vocab.decode(ids))
    return samples
