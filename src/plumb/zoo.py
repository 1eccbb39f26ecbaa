"""Small versions of the architectures people train, written for plumb's tests and fault
catalogue (none written *for* the probes): a pre-LayerNorm GPT with tied token/output
weights and ``F.scaled_dot_product_attention`` (nanoGPT's shape), makemore-style RNN and
GRU language models whose cells call ``torch.tanh``/``torch.sigmoid`` themselves, a CNN
with BatchNorm2d, and a pre-norm residual MLP; plus the offline data they train on.

Each has the usual recipe in :data:`RECIPES` (optimizer, lr, batch). Sizes are small so
that a hundred steps take seconds on two CPU cores; the structure is the real one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plumb.data import names_path

Batches = Callable[[], tuple[Tensor, Tensor]]


# --- data -------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    return tuple(w for w in names_path().read_text(encoding="utf-8").split() if w)


def char_vocab() -> list[str]:
    """'\\n' then a..z: the names file read as one stream of text (27 symbols)."""
    return ["\n", *sorted({c for w in _names() for c in w})]


@lru_cache(maxsize=1)
def _text_ids() -> Tensor:
    stoi = {c: i for i, c in enumerate(char_vocab())}
    return torch.tensor([stoi[c] for c in "\n".join(_names()) + "\n"], dtype=torch.long)


def text_windows(block: int = 32, batch: int = 16, seed: int = 0) -> Batches:
    """Random windows of the names text (nanoGPT's character-level sampling): inputs
    (B, T) and the next characters (B, T)."""
    ids = _text_ids()
    g = torch.Generator().manual_seed(seed)

    def draw() -> tuple[Tensor, Tensor]:
        ix = torch.randint(0, len(ids) - block - 1, (batch,), generator=g)
        x = torch.stack([ids[i : i + block] for i in ix.tolist()])
        y = torch.stack([ids[i + 1 : i + 1 + block] for i in ix.tolist()])
        return x, y

    return draw


def name_sequences(batch: int = 32, seed: int = 0) -> Batches:
    """makemore's dataset: each name as ids of its characters (1..26) after a start
    token 0, targets shifted by one and padded with -1 (ignored by cross_entropy)."""
    names = _names()
    length = max(len(w) for w in names) + 1
    stoi = {c: i + 1 for i, c in enumerate(sorted({c for w in names for c in w}))}
    X = torch.zeros(len(names), length, dtype=torch.long)
    Y = torch.full((len(names), length), -1, dtype=torch.long)
    for k, w in enumerate(names):
        ids = [stoi[c] for c in w]
        X[k, 1 : 1 + len(ids)] = torch.tensor(ids)
        Y[k, : len(ids)] = torch.tensor(ids)
        Y[k, len(ids)] = 0
    g = torch.Generator().manual_seed(seed)

    def draw() -> tuple[Tensor, Tensor]:
        ix = torch.randint(0, len(names), (batch,), generator=g)
        return X[ix], Y[ix]

    return draw


def blobs(
    n: int = 4096,
    features: int = 20,
    classes: int = 10,
    batch: int = 64,
    seed: int = 0,
    scale: float = 1.0,
    offset: float = 0.0,
) -> Batches:
    """Gaussian clusters: class centres ~ N(0, I), points = centre + N(0, I), then
    standardised (x * scale + offset gives the un-standardised variants)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, features, generator=g)
    x = (x - x.mean(0)) / x.std(0)
    x = x * scale + offset
    return sampler(x, y, batch, seed)


def strokes(
    n: int = 2048,
    classes: int = 4,
    size: int = 16,
    batch: int = 64,
    seed: int = 0,
    raw: bool = False,
) -> Batches:
    """1 x size x size images: a bright bar whose orientation/position is the class, plus
    noise; pixels in [0, 1] standardised (``raw``: 0-255 bytes as floats, unnormalised)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    img = 0.2 * torch.rand(n, 1, size, size, generator=g)
    pos = torch.randint(2, size - 2, (n,), generator=g)
    for i in range(n):
        c, p = int(y[i]), int(pos[i])
        if c == 0:
            img[i, 0, p, :] = 1.0
        elif c == 1:
            img[i, 0, :, p] = 1.0
        elif c == 2:
            img[i, 0].diagonal().fill_(1.0)
        else:
            img[i, 0].flip(1).diagonal().fill_(1.0)
    img = img.clamp(0, 1)
    x = (img * 255).round() if raw else (img - img.mean()) / img.std()
    return sampler(x, y, batch, seed)


def sampler(x: Tensor, y: Tensor, batch: int, seed: int) -> Batches:
    g = torch.Generator().manual_seed(seed + 1)

    def draw() -> tuple[Tensor, Tensor]:
        ix = torch.randint(0, x.shape[0], (batch,), generator=g)
        return x[ix], y[ix]

    return draw


def sequence_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of (B, T, V) logits, as nanoGPT and makemore compute it: flattened
    to (B*T, V), targets -1 ignored."""
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


# --- a GPT (pre-LayerNorm, tied weights, SDPA) --------------------------------------------
@dataclass
class GPTConfig:
    vocab_size: int = 27
    block_size: int = 32
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's cannot drop it), as nanoGPT writes it."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.resid_dropout = nn.Dropout(c.dropout)
        self.dropout = c.dropout

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class GPTMLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(c.n_embd, c.bias)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = LayerNorm(c.n_embd, c.bias)
        self.mlp = GPTMLP(c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings, pre-LN blocks, a final LayerNorm and an output head
    that shares the token embedding's weight. Init N(0, 0.02), residual projections
    N(0, 0.02 / sqrt(2 n_layer)) (GPT-2's scaled init)."""

    def __init__(self, c: GPTConfig, init_std: float = 0.02, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = c
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(c.vocab_size, c.n_embd),
                wpe=nn.Embedding(c.block_size, c.n_embd),
                drop=nn.Dropout(c.dropout),
                h=nn.ModuleList([Block(c) for _ in range(c.n_layer)]),
                ln_f=LayerNorm(c.n_embd, c.bias),
            )
        )
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = (
                    init_std / math.sqrt(2 * c.n_layer)
                    if name.endswith("c_proj.weight")
                    else init_std
                )
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# --- makemore's RNN and GRU ----------------------------------------------------------------
class RNNCell(nn.Module):
    """h_t = tanh(W [x_t, h_{t-1}] + b) (makemore's RNNCell)."""

    def __init__(self, n_embd: int, n_embd2: int):
        super().__init__()
        self.xh_to_h = nn.Linear(n_embd + n_embd2, n_embd2)

    def forward(self, xt: Tensor, hprev: Tensor) -> Tensor:
        return torch.tanh(self.xh_to_h(torch.cat([xt, hprev], dim=1)))


class GRUCell(nn.Module):
    """makemore's GRU cell: reset and update gates, a candidate state, their blend."""

    def __init__(self, n_embd: int, n_embd2: int):
        super().__init__()
        self.xh_to_z = nn.Linear(n_embd + n_embd2, n_embd2)
        self.xh_to_r = nn.Linear(n_embd + n_embd2, n_embd2)
        self.xh_to_hbar = nn.Linear(n_embd + n_embd2, n_embd2)

    def forward(self, xt: Tensor, hprev: Tensor) -> Tensor:
        xh = torch.cat([xt, hprev], dim=1)
        r = torch.sigmoid(self.xh_to_r(xh))
        xhr = torch.cat([xt, r * hprev], dim=1)
        hbar = torch.tanh(self.xh_to_hbar(xhr))
        z = torch.sigmoid(self.xh_to_z(xh))
        return (1 - z) * hprev + z * hbar


class RNNLM(nn.Module):
    """Embedding -> a cell run over the sequence from a learned start state (zeros at
    init) -> a linear head: (B, T) ids -> (B, T, V) logits."""

    def __init__(
        self,
        vocab_size: int = 27,
        n_embd: int = 32,
        n_embd2: int = 64,
        cell: str = "rnn",
        seed: int = 0,
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.start = nn.Parameter(torch.zeros(1, n_embd2))
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.cell = RNNCell(n_embd, n_embd2) if cell == "rnn" else GRUCell(n_embd, n_embd2)
        self.lm_head = nn.Linear(n_embd2, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        emb = self.wte(idx)
        h = self.start.expand(idx.shape[0], -1)
        hs = []
        for t in range(idx.shape[1]):
            h = self.cell(emb[:, t, :], h)
            hs.append(h)
        return self.lm_head(torch.stack(hs, 1))


# --- a CNN with BatchNorm, a residual MLP ---------------------------------------------------
def cnn_bn(classes: int = 4, seed: int = 0, softmax: bool = False) -> nn.Sequential:
    """conv-BN-ReLU x3 (bias-free convs, stride 2 to downsample), global average
    pooling, a linear classifier; Kaiming-normal (fan_out) convs as torchvision's ResNet."""
    torch.manual_seed(seed)

    def block(a: int, b: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(a, b, 3, stride, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]

    layers = [*block(1, 16, 1), *block(16, 32, 2), *block(32, 32, 2)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes)]
    if softmax:
        layers.append(nn.Softmax(dim=1))
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


class ResMLP(nn.Module):
    """x -> Linear -> [x + W2 relu(W1 LN(x))] x depth -> LN -> Linear (pre-norm
    residual blocks, torch's default init)."""

    def __init__(
        self, features: int = 20, width: int = 64, depth: int = 4, classes: int = 10, seed: int = 0
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, 2 * width),
                nn.ReLU(),
                nn.Linear(2 * width, width),
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x))


# --- models that return more than logits, a causal-conv LM, a patch transformer -----------
class LSTMLM(nn.Module):
    """Embedding -> dropout -> nn.LSTM -> a linear head; returns ``(logits, (h, c))`` as
    recurrent models often do (the logits first, the state for the next chunk)."""

    def __init__(
        self,
        vocab_size: int = 27,
        n_embd: int = 32,
        hidden: int = 64,
        dropout: float = 0.1,
        seed: int = 0,
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(n_embd, hidden, batch_first=True)
        self.lm_head = nn.Linear(hidden, vocab_size)

    def forward(self, idx: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, state = self.lstm(self.drop(self.wte(idx)))
        return self.lm_head(h), state


@dataclass
class CausalLMOutput:
    """What a Hugging Face causal LM returns, in miniature: an object with ``.logits``
    (and ``.loss``, None without labels)."""

    logits: Tensor
    loss: Tensor | None = None


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = SwiGLU(dim, 4 * dim * 2 // 3)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """A Llama-style decoder: RMSNorm, SwiGLU, learned positions, an untied head, no
    biases, N(0, 0.02) init; returns a ``CausalLMOutput``."""

    def __init__(
        self,
        vocab_size: int = 27,
        block_size: int = 32,
        dim: int = 48,
        layers: int = 2,
        heads: int = 4,
        seed: int = 0,
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(block_size, dim)
        self.layers = nn.ModuleList(LlamaBlock(dim, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx: Tensor) -> CausalLMOutput:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for layer in self.layers:
            x = layer(x)
        return CausalLMOutput(self.lm_head(self.norm(x)))


class CausalConvLM(nn.Module):
    """A WaveNet-style language model: dilated causal Conv1d blocks (kernel 2, dilation
    1, 2, 4, 8) with GELU and residual sums, then a linear head: (B, T) -> (B, T, V).
    ``detach``: the bug of a forward that detaches the embedding output."""

    def __init__(
        self,
        vocab_size: int = 27,
        channels: int = 48,
        levels: int = 4,
        seed: int = 0,
        detach: bool = False,
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.detach = detach
        self.wte = nn.Embedding(vocab_size, channels)
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, 2, dilation=2**i) for i in range(levels)
        )
        self.lm_head = nn.Linear(channels, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx).transpose(1, 2)  # (B, C, T)
        if self.detach:
            x = x.detach()
        for conv in self.convs:
            pad = conv.dilation[0] * (conv.kernel_size[0] - 1)
            x = x + F.gelu(conv(F.pad(x, (pad, 0))))  # left padding: causal
        return self.lm_head(x.transpose(1, 2))


class PatchTransformer(nn.Module):
    """A ViT in miniature: 4x4 patches by a strided conv, a class token, learned
    positions, pre-LN encoder layers (``nn.TransformerEncoderLayer``, GELU), a head."""

    def __init__(
        self,
        size: int = 16,
        patch: int = 4,
        dim: int = 32,
        layers: int = 2,
        classes: int = 4,
        dropout: float = 0.0,
        seed: int = 0,
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Conv2d(1, dim, patch, patch)
        n = (size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n + 1, dim))
        layer = nn.TransformerEncoderLayer(
            dim, 4, 2 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.encoder(t))[:, 0])
