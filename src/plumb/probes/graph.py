"""What the autograd graph says about a model: where its predictions are
(``logits_of``), what the loss expression did to them (``loss_path``), and which weight
layers feed each other (``Chains``, for the doctor's depth rules)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from torch import Tensor

from plumb.kinds import NORMS, WEIGHT_LAYERS

# Autograd nodes a weight layer's input may pass through and still be the output of the
# layer before it, for chain discovery: shape changes, element-wise arithmetic and
# activations, dropout, pooling, casts (matched as name prefixes, version digits dropped).
PASS_THROUGH = (
    "AccumulateGrad",
    "View",
    "UnsafeView",
    "Reshape",
    "Transpose",
    "Permute",
    "T",
    "Expand",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Select",
    "Split",
    "Unbind",
    "Clone",
    "AsStrided",
    "Alias",
    "ToCopy",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Tanh",
    "Sigmoid",
    "Relu",
    "Gelu",
    "Silu",
    "LeakyRelu",
    "Elu",
    "Hardtanh",
    "Threshold",
    "Softplus",
    "Mish",
    "NativeDropout",
    "MaxPool",
    "AvgPool",
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
)


def logits_of(output: Any) -> Tensor | None:
    """The tensor a model's output carries its predictions in: the output itself, the
    ``logits`` of a dict or of a ``ModelOutput``-like object, else the first floating
    tensor of >= 2 dims in a tuple/list (``(logits, loss)``), else the first tensor."""
    if isinstance(output, Tensor):
        return output
    named = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(named, Tensor):
        return named
    items = list(output.values()) if isinstance(output, dict) else output
    if isinstance(items, tuple | list):
        tensors = [t for t in items if isinstance(t, Tensor)]
        wide = [t for t in tensors if t.is_floating_point() and t.dim() >= 2]
        return (wide or tensors or [None])[0]
    return None


#: saved scalar attributes of an autograd node kept in the loss path (they outlive backward)
_NODE_ATTRS = {"_saved_reduction": "reduction", "_saved_dim": "dim"}


def loss_path(loss: Tensor, output_node: Any, budget: int = 256) -> list[dict[str, Any]] | None:
    """The autograd nodes from ``loss`` down to the node that made the model's output, as
    ``[{"op": "NllLossBackward0", "reduction": 1}, {"op": "LogSoftmaxBackward0", "dim": 1},
    ...]`` (loss first): what the user's loss expression did to the output. Read after
    backward (the graph's structure and its scalar attributes outlive it; only saved
    tensors are freed). None when the output is not reached within ``budget`` nodes."""
    start = getattr(loss, "grad_fn", None)
    if start is None or output_node is None:
        return None
    parent: dict[int, Any] = {id(start): None}
    nodes = {id(start): start}
    queue = [start]
    while queue and len(nodes) <= budget:
        node = queue.pop(0)
        if node is output_node:
            path = []
            while node is not None:
                step = {"op": type(node).__name__}
                for attr, key in _NODE_ATTRS.items():
                    v = getattr(node, attr, None) if hasattr(node, attr) else None
                    if isinstance(v, int):
                        step[key] = v - (1 << 64) if v >= 1 << 63 else v  # unsigned -> signed
                path.append(step)
                node = parent[id(node)]
            return path[::-1]
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in nodes:
                nodes[id(nxt)], parent[id(nxt)] = nxt, node
                queue.append(nxt)
    return None


def first_tensor(x: Any) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, tuple | list):
        return next((t for t in x if isinstance(t, Tensor)), None)
    if isinstance(x, dict):
        return next((t for t in x.values() if isinstance(t, Tensor)), None)
    return None


class Chains:
    """Chain discovery. While no chains are known, each captured output's autograd node
    is noted (``note``), each weight layer's input is traced back to the nearest noted
    outputs (``feeds``; what it found is ``link``ed to the layer), and the first complete
    record step turns the links into ``chains`` (``build``)."""

    def __init__(self) -> None:
        self.nodes: dict[int, tuple[str, str, Any]] = {}  # id(grad_fn) -> (key, kind, node)
        self.links: dict[str, set[frozenset[str]]] = defaultdict(set)
        self.chains: list[list[str]] | None = None  # weight layers that feed each other

    def new_graph(self) -> None:
        """A new forward: the last pass's nodes are not in its graph."""
        self.nodes = {}

    def note(self, key: str, kind: str, t: Tensor) -> None:
        """``t`` (a captured output of layer ``key``) is a place a trace can stop."""
        if t.grad_fn is not None and id(t.grad_fn) not in self.nodes:
            self.nodes[id(t.grad_fn)] = (key, kind, t.grad_fn)

    def link(self, key: str, sources: frozenset[str]) -> None:
        self.links[key].add(sources)

    def feeds(self, inp: Tensor | None, budget: int = 4096) -> frozenset[str]:
        """What a weight layer's input comes from, walking the autograd graph back from
        it to the nearest recorded outputs: weight layers (their keys), through
        element-wise ops, activations, pooling and shape changes (``PASS_THROUGH``:
        where Kaiming's propagation argument holds); a normalisation or an embedding
        output is a start ("<norm>"), any other op (attention, a matrix product of two
        activations) a mix ("<mix>"). Empty: the input is data."""
        found: set[str] = set()
        stack = [inp.grad_fn] if inp is not None and inp.grad_fn is not None else []
        seen: set[int] = set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            hit = self.nodes.get(id(node))
            if hit is not None and hit[1] in WEIGHT_LAYERS:
                found.add(hit[0])
                continue
            if hit is not None and hit[1] in (*NORMS, "embedding"):
                found.add("<norm>")
                continue
            if hit is None and not node.name().rstrip("0123456789").startswith(PASS_THROUGH):
                found.add("<mix>")
                continue
            if len(seen) > budget:
                found.add("<unknown>")
                break
            stack.extend(n for n, _ in node.next_functions)
        return frozenset(found)

    def build(self, order: list[str], kinds: dict[str, str]) -> list[list[str]]:
        """Weight layers that feed each other directly (through activations, with no
        normalisation, merge or embedding between): the maximal paths, in forward order.
        A layer whose every call has exactly one weight layer A as its source extends A's
        chain; a layer fed by a norm, by several layers (a residual sum, an RNN's state)
        or by the data starts one."""
        weights = [k for k in order if kinds.get(k) in WEIGHT_LAYERS]
        link: dict[str, str] = {}
        for k in weights:
            preds = self.links.get(k, set())
            sources = {next(iter(p)) for p in preds if len(p) == 1}
            if preds and len(preds) == 1 and len(sources) == 1:
                src = next(iter(sources))
                if src in weights and not src.startswith("<") and src != k:
                    link[k] = src
        nxt: dict[str, list[str]] = defaultdict(list)
        for b, a in link.items():
            nxt[a].append(b)
        chains: list[list[str]] = []

        def walk(path: list[str]) -> None:
            if len(chains) > 256:
                return
            succ = nxt.get(path[-1], [])
            if not succ:
                chains.append(path)
            for s in succ:
                if s not in path:
                    walk([*path, s])

        for k in weights:
            if k not in link:
                walk([k])
        self.links.clear()
        self.nodes = {}
        self.chains = chains
        return chains
