"""The exact fix of a finding: the line that applies it.

A finding's message says what to change in words; ``exact_fix`` gives the thing to type.
For a plumb run (its ``config.json`` at hand) that is the ``plumb train`` flags that
make the change, computed from the run's own configuration and the finding's evidence
(``--out-scale 0.01`` is the current scale times the factor the doctor measured). For a
user's own loop it is one line of PyTorch. Where the fix is a judgment (find where the
forward cuts a layer off; decide whether a freeze was meant) there is no line: ``None``,
and the message stands alone.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

#: hidden-layer faults that a scheme of the init repairs, or else a norm layer
_DEPTH = (
    "activations-vanishing",
    "activations-exploding",
    "gradients-vanishing",
    "gradients-exploding",
    "symmetric-weights",
)


def attr_path(name: str, root: str = "model") -> str:
    """``blocks.0.mlp`` -> ``model.blocks[0].mlp``: a module's dotted name as the
    Python expression that reaches it (``get_submodule`` when a part is not an identifier)."""
    parts = name.split(".") if name else []
    out = root
    for p in parts:
        if p.isdigit():
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_]\w*", p):
            out += f".{p}"
        else:
            return f'{root}.get_submodule("{name}")'
    return out


def _num(x: float) -> str:
    return f"{x:.3g}"


def _lr_to(f: dict[str, Any], lr: float | None) -> float | None:
    """The lr the finding advises: its suggestion, else a decade its way."""
    ev = f.get("evidence", {})
    s = ev.get("suggested_lr")
    if isinstance(s, int | float) and s > 0 and s != lr:
        return float(s)
    base = ev.get("lr", lr)
    if not isinstance(base, int | float) or base <= 0:
        return None
    return base * 10 if f.get("code") == "lr-too-low" else base / 10


def plumb_fix(f: dict[str, Any], config: dict[str, Any]) -> str | None:
    """The ``plumb train`` flags that apply finding ``f`` to the run whose ``config.json``
    is ``config``; None when no flag does."""
    code, ev, where = f.get("code"), f.get("evidence", {}), f.get("where", "")
    model, train = config.get("model", {}), config.get("train", {})
    if code == "overconfident-init":
        scale = ev.get("scale")
        if not isinstance(scale, int | float):
            return None
        flags = f"--out-scale {_num((model.get('out_scale') or 1.0) * scale)}"
        if model.get("out_bias_scale"):
            flags += " --out-bias-scale 0"
        return flags
    if code in ("lr-too-high", "lr-too-low", "non-finite") and where != "schedule":
        lr = _lr_to(f, train.get("lr"))
        return f"--lr {_num(lr)}" if lr else None
    if code == "lr-too-low" and where == "schedule":
        return f"--lr-decay-step {int(train.get('steps', 0)) // 2}" if train.get("steps") else None
    if code == "redundant-bias":
        return "--bias auto"
    if code in _DEPTH or (code in ("saturated-activations", "dead-units") and "norm" not in ev):
        if model.get("init") != "kaiming":
            return "--init kaiming"
        if model.get("norm") in (None, "none"):
            return "--norm batch"
        if code == "dead-units" and model.get("activation") == "relu":
            return "--activation leaky_relu"
        return None
    if code == "saturated-activations":  # a norm's gain grew in training: decay earlier
        steps, decay = train.get("steps"), train.get("lr_decay_step")
        # ... unless the weights are averaged: the average lives on the iterates' spread,
        # and decaying under it hurt (best-10min at 400k: val 1.9453 -> 1.9536); the
        # message's other advice, stopping earlier, is a judgment, not a flag
        averaged = train.get("average_from") is not None
        if steps and (decay is None or decay >= steps) and not averaged:
            return f"--lr-decay-step {int(steps) // 2}"
    return None


def code_fix(f: dict[str, Any]) -> str | None:
    """One line of PyTorch that applies finding ``f`` in a user's loop; None when the
    fix is a judgment rather than a line."""
    code, ev, where = f.get("code"), f.get("evidence", {}), f.get("where", "")
    if code == "overconfident-init":
        s = ev.get("scale")
        if not isinstance(s, int | float):
            return None
        if ev.get("tied_to"):
            return f"logits = logits * {s:g}  # in forward: the output weight is tied"
        return f"with torch.no_grad(): {attr_path(where)}.weight.mul_({s:g})"
    if code in ("lr-too-high", "lr-too-low", "non-finite") and where != "schedule":
        lr = _lr_to(f, None)
        return f'for g in optimizer.param_groups: g["lr"] = {_num(lr)}' if lr else None
    if code == "untrained-parameters":
        if ev.get("not_in_optimizer"):
            return "optimizer = torch.optim.AdamW(model.parameters(), lr=lr)  # after the model is complete"
        if ev.get("frozen") and ev.get("in_optimizer"):
            return f"{attr_path(ev['frozen'][0].rsplit('.', 1)[0])}.requires_grad_(True)"
        return None
    return {
        "double-softmax": "loss = F.cross_entropy(logits, y)  # the raw logits, no softmax before it",
        "double-sigmoid": "loss = F.binary_cross_entropy_with_logits(logits, y)  # raw logits",
        "loss-summed": 'loss = F.cross_entropy(logits, y, reduction="mean")',
        "batchnorm-train-mode-in-eval": "model.eval()  # before evaluating (model.train() after)",
        "batchnorm-eval-mode-in-training": "model.train()  # before the training steps",
        "gradients-accumulating": "optimizer.zero_grad(set_to_none=True)  # every step",
        "unnormalized-inputs": "x = (x - mean) / std  # mean, std of the training inputs",
        "redundant-bias": f"{attr_path(where)}.bias = None  # or bias=False: the norm after it removes it",
        "symmetric-weights": f"torch.nn.init.kaiming_normal_({attr_path(where)}.weight)",
    }.get(code or "")


def exact_fix(f: dict[str, Any], config: dict[str, Any] | None = None) -> str | None:
    """The flags (``config``: a plumb run's ``config.json``) or the line of code that
    applies finding ``f`` (a ``Finding.to_dict()``); None when no one line does."""
    if config and config.get("model"):
        return plumb_fix(f, config)
    return code_fix(f)


PROBLEMS = ("error", "warning")


@dataclass
class Headline:
    """A run's verdict in one line: ``kind`` is "bad" (errors or warnings), "good" (the
    doctor checked and found no problem) or "unknown" (it did not run); ``fix`` is the
    first problem's exact fix (flags or a line of code), when it has one."""

    kind: str
    text: str
    fix: str | None = None

    def plain(self) -> str:
        return self.text + (f" - fix first: {self.fix}" if self.fix else "")

    def html(self) -> str:
        fix = f" — fix first: <code>{html.escape(self.fix)}</code>" if self.fix else ""
        return f'<div class="headline {self.kind}"><b>{html.escape(self.text)}</b>{fix}</div>'


def headline(
    findings: list[dict[str, Any]] | None,
    steps: int,
    result: str = "",
    config: dict[str, Any] | None = None,
) -> Headline:
    """The verdict of a run of ``steps`` steps whose findings (sorted: errors first) are
    ``findings`` (None: the doctor did not run); ``result`` is what it reached ("val
    2.29"). The fix named is the first problem's that has a line."""
    reached = f": {result}" if result else ""
    if findings is None:
        return Headline("unknown", f"Not diagnosed after {steps:,} steps{reached}")
    problems = [f for f in findings if f.get("severity") in PROBLEMS]
    if not problems:
        notes = len(findings)
        extra = f" ({notes} note{'s' if notes != 1 else ''} below)" if notes else ""
        return Headline("good", f"Healthy after {steps:,} steps{reached}{extra}")
    n = len(problems)
    fix = next((x for x in (exact_fix(f, config) for f in problems) if x), None)
    first = problems[0]
    text = f"Needs attention: {n} problem{'s' if n != 1 else ''}"
    if fix is None:
        text += f" — first: {first.get('code')} at {first.get('where')}"
    return Headline("bad", text, fix)


def finding_lines(f: dict[str, Any], config: dict[str, Any] | None = None) -> list[str]:
    """A finding for a terminal: ``[severity] code @ where: message``, then its fix on a
    line of its own when it has one."""
    lines = [f"  [{f.get('severity')}] {f.get('code')} @ {f.get('where')}: {f.get('message')}"]
    fix = exact_fix(f, config)
    if fix:
        lines.append(f"      fix: {fix}")
    return lines


def verdict_lines(
    findings: list[dict[str, Any]] | None,
    steps: int,
    result: str = "",
    config: dict[str, Any] | None = None,
    prefix: str = "doctor",
) -> list[str]:
    """The end of a run for a terminal: ``PREFIX: <headline>``, then every finding with
    its fix (they were printed when found, maybe far above)."""
    lines = [f"{prefix}: {headline(findings, steps, result, config).plain()}"]
    for f in findings or []:
        lines += finding_lines(f, config)
    return lines
