"""A catalogue of training set-ups: broken ones that each inject one fault, and healthy
ones the doctor must pass without a warning. ``plumb doctor --catalogue`` runs it and
prints the confusion table; the tests assert every row.

Two families: plumb's own (the lecture's nets, small torch.nn MLPs and CNNs) and the
*zoo* (``plumb.zoo``: a pre-LN GPT with tied weights, makemore's RNN and GRU, a CNN with
BatchNorm2d, a residual MLP), each with its usual recipe, and faults injected into them.
The faults are the realistic version of each mistake, at the magnitudes they happen in
practice (lr x100 and / 10^4, N(0, 1) init, raw pixels, a loop without zero_grad), never
sized to sit just past a threshold. Most set-ups run through ``plumb.diagnose``; faults of
the training loop itself run the user's loop under ``plumb.Monitor(doctor=True)`` with
its defaults. Data are generated offline from fixed seeds (or the bundled names).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plumb import zoo
from plumb.data import load_dataset
from plumb.doctor import Diagnosis, diagnose
from plumb.init import kaiming_normal_
from plumb.models import MLP, ModelConfig, preset_config
from plumb.monitor import Monitor
from plumb.zoo import blobs, strokes

Build = Callable[[], tuple[nn.Module, Any, Callable, torch.optim.Optimizer]]
Loop = Callable[[nn.Module, Any, Callable, torch.optim.Optimizer, Monitor, int], None]


@dataclass
class SetUp:
    name: str
    family: str  # plumb.nn | torch.nn | zoo
    expect: tuple[str, ...]  # codes it must yield (empty: healthy, no warning or error)
    build: Build
    about: str
    steps: int = 100
    loop: Loop | None = None  # the user's own training loop (run under Monitor(doctor=True))


@dataclass
class Outcome:
    setup: SetUp
    codes: set[str]
    problems: set[str]  # codes with severity warning or error
    seconds: float
    findings: list = field(default_factory=list)
    diagnosis: Diagnosis | None = None

    @property
    def fix(self) -> dict[str, Any] | None:
        """The measured fix of the injected fault's own finding (``diagnose(verify=True)``):
        the first finding with an expected code whose fix was applied and measured."""
        for f in self.findings:
            if f.code in self.setup.expect and "verified" in f.evidence:
                return f.evidence["verified"]
        return None

    @property
    def extra(self) -> set[str]:
        """Codes beyond the injected fault and its known consequences: false findings."""
        return self.codes - set(self.setup.expect) - consequences(self.setup.name)

    @property
    def passed(self) -> bool:
        if not self.setup.expect:
            return not self.problems
        return set(self.setup.expect) <= self.codes and not self.extra


# --- data -------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _names():
    return load_dataset(None, block_size=3)


def names_batches(batch: int = 32, seed: int = 0):
    data = _names()
    X, Y = data.train.X, data.train.Y.long()
    g = torch.Generator().manual_seed(seed)

    def draw() -> tuple[Tensor, Tensor]:
        ix = torch.randint(0, X.shape[0], (batch,), generator=g)
        return X[ix], Y[ix]

    return draw


# --- models -------------------------------------------------------------------------------
def plumb_model(seed: int = 2147483647, preset: str | None = None, **cfg: Any) -> MLP:
    config = preset_config(preset, **cfg) if preset else ModelConfig(**cfg)
    config.vocab_size = _names().vocab.size
    return MLP(config, torch.Generator().manual_seed(seed))


def mlp(
    widths: list[int],
    act: Callable[[], nn.Module] = nn.ReLU,
    norm: Callable[[int], nn.Module] | None = None,
    bias: bool = True,
    seed: int = 0,
) -> nn.Sequential:
    """Linear -> [norm] -> act blocks, then a Linear output; torch's default init."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths[:-1]):
        layers.append(nn.Linear(a, b, bias=bias))
        if norm is not None:
            layers.append(norm(b))
        layers.append(act())
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


def init_linears(
    model: nn.Module, fn: Callable[[Tensor], Any], bias: float | None = 0.0, skip_last: bool = False
) -> nn.Module:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if skip_last:
        linears = linears[:-1]
    with torch.no_grad():
        for m in linears:
            fn(m.weight)
            if m.bias is not None and bias is not None:
                m.bias.fill_(bias)
    return model


def kaiming(gain: float):
    """Kaiming normal (fan_in) for torch's (out, in, *kernel) weights."""
    return lambda w: kaiming_normal_(w, gain, layout="out_in")


def cnn(seed: int = 0, softmax: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    ]
    if softmax:
        layers.append(nn.Softmax(dim=1))
    return nn.Sequential(*layers)


class FrozenBackbone(nn.Module):
    """A feature extractor used under no_grad (frozen) with a trainable head: the classic
    way to leave its BatchNorm in training mode at evaluation (and here, always)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU())
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            f = self.backbone(x)
        return self.head(f)


def sgd(model: nn.Module, lr: float, momentum: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum
    )


def adamw(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


CE = F.cross_entropy


def _setups() -> list[SetUp]:
    W = [20, 64, 64, 64, 10]  # a blob MLP: 3 hidden layers
    deep = [20] + [64] * 10 + [10]  # 10 hidden layers

    def plumb_run(lr: float = 0.1, **cfg):
        def build():
            m = plumb_model(**cfg)
            return m, names_batches(), CE, sgd(m, lr)

        return build

    def kaiming_relu(lr=0.05, **kw):
        m = init_linears(mlp(W, **kw), kaiming(math.sqrt(2)))
        return m, blobs(), CE, sgd(m, lr, momentum=0.9)

    def zero_init():
        m = init_linears(mlp(W, act=nn.Tanh), lambda w: w.zero_())
        return m, blobs(), CE, sgd(m, 0.1)

    def neg_bias():
        m = init_linears(mlp(W), kaiming(math.sqrt(2)), bias=-3.0)
        return m, blobs(), CE, sgd(m, 0.05, momentum=0.9)

    def tiny_gain():
        m = init_linears(mlp(deep, act=nn.Tanh), kaiming(0.5))
        return m, blobs(), CE, sgd(m, 0.05)

    def relu_big_gain():
        m = init_linears(mlp(deep), kaiming(2.5))
        return m, blobs(), CE, sgd(m, 1e-4)

    def deep_sigmoid():
        m = mlp(deep, act=nn.Sigmoid)  # torch's default init
        return m, blobs(), CE, sgd(m, 0.1)

    def deep_linear_big_gain():
        m = init_linears(mlp(deep, act=nn.Identity), kaiming(1.5))
        return m, blobs(), CE, sgd(m, 1e-4)

    def unscaled_tanh_torch():
        m = init_linears(mlp(W, act=nn.Tanh), lambda w: w.normal_(0, 1), skip_last=True)
        with torch.no_grad():
            m[-1].weight.mul_(0.01)
        return m, blobs(), CE, sgd(m, 0.05)

    def overconfident_torch():
        m = init_linears(mlp(W), kaiming(math.sqrt(2)))
        with torch.no_grad():
            m[-1].weight.normal_(0, 1)  # N(0, 1) output weights: no 1/sqrt(fan_in)
        return m, blobs(), CE, sgd(m, 0.05, momentum=0.9)

    def bn_eval_mode():
        m = init_linears(mlp(W, norm=nn.BatchNorm1d, bias=False), kaiming(math.sqrt(2)))
        m.eval()  # left in eval mode (e.g. after a validation pass)
        return m, blobs(), CE, sgd(m, 0.05, momentum=0.9)

    def bias_before_bn():
        m = init_linears(mlp(W, norm=nn.BatchNorm1d, bias=True), kaiming(math.sqrt(2)))
        return m, blobs(), CE, sgd(m, 0.05, momentum=0.9)

    def frozen_bn():
        m = FrozenBackbone()
        return m, blobs(), CE, sgd(m, 0.05, momentum=0.9)

    def uneven():
        m = init_linears(mlp(W, norm=nn.BatchNorm1d, bias=False), kaiming(math.sqrt(2)))
        with torch.no_grad():
            m[3].weight.mul_(30.0)  # one layer initialised 30x too large; BN hides it forward
        return m, blobs(), CE, sgd(m, 0.05, momentum=0.9)

    def cnn_run(raw=False, softmax=False, lr=1e-3):
        def build():
            m = cnn(softmax=softmax)
            return m, strokes(raw=raw), CE, torch.optim.Adam(m.parameters(), lr=lr)

        return build

    def log_softmax_nll():
        m = nn.Sequential(init_linears(mlp(W), kaiming(math.sqrt(2))), nn.LogSoftmax(dim=1))
        return m, blobs(), F.nll_loss, sgd(m, 0.05, momentum=0.9)

    def adamw_layernorm():
        m = mlp(W, act=nn.GELU, norm=nn.LayerNorm)
        return m, blobs(), CE, adamw(m, 1e-3)

    def adamw_lr(lr):
        def build():
            m = mlp(W, act=nn.GELU, norm=nn.LayerNorm)
            return m, blobs(), CE, adamw(m, lr)

        return build

    def nan_lr():
        m = init_linears(mlp(W), kaiming(math.sqrt(2)))
        return m, blobs(), CE, sgd(m, 50.0, momentum=0.9)  # 1000x the healthy 0.05

    def relu_lr(lr):
        def build():
            m = init_linears(mlp(W), kaiming(math.sqrt(2)))
            return m, blobs(), CE, sgd(m, lr, momentum=0.9)

        return build

    P, T = "plumb.nn", "torch.nn"
    return [
        # ----- healthy ----------------------------------------------------------------------
        SetUp(
            "lecture-deep",
            P,
            (),
            plumb_run(preset="lecture-deep"),
            "the lecture's final deep net: 5 x [Linear, BatchNorm, Tanh], lr 0.1",
        ),
        SetUp(
            "lecture-mlp-batchnorm",
            P,
            (),
            plumb_run(preset="lecture-mlp:batchnorm"),
            "the lecture's final single-hidden-layer net with batch norm",
        ),
        SetUp(
            "plumb-relu-layernorm",
            P,
            (),
            plumb_run(n_layers=3, norm="layer", activation="relu"),
            "plumb MLP, 3 x [Linear, LayerNorm, ReLU], Kaiming sqrt(2)",
        ),
        SetUp(
            "kaiming-relu-mlp",
            T,
            (),
            kaiming_relu,
            "torch.nn ReLU MLP, Kaiming normal sqrt(2), SGD momentum",
        ),
        SetUp(
            "small-cnn",
            T,
            (),
            cnn_run(),
            "torch.nn CNN (2 conv + 2 linear, default init), Adam 1e-3",
        ),
        SetUp(
            "adamw-layernorm-gelu",
            T,
            (),
            adamw_layernorm,
            "torch.nn GELU MLP with LayerNorm, AdamW 1e-3, default init",
        ),
        SetUp(
            "log-softmax-nll",
            T,
            (),
            log_softmax_nll,
            "log_softmax output with nll_loss (the right pairing)",
        ),
        # ----- broken -----------------------------------------------------------------------
        SetUp(
            "lecture-unscaled-output",
            P,
            ("overconfident-init",),
            plumb_run(preset="lecture-mlp:kaiming", out_scale=1.0, out_bias_scale=1.0),
            "the lecture's first mistake: W2, b2 ~ N(0, 1) (confidently wrong softmax)",
        ),
        SetUp(
            "torch-unscaled-output",
            T,
            ("overconfident-init",),
            overconfident_torch,
            "output layer weights N(0, 1) instead of 1/sqrt(fan_in)",
        ),
        SetUp(
            "lecture-unscaled-tanh",
            P,
            ("saturated-activations",),
            plumb_run(preset="lecture-mlp:fix-softmax"),
            "the lecture's second mistake: W1, b1 ~ N(0, 1) into tanh",
        ),
        SetUp(
            "torch-unscaled-tanh",
            T,
            ("saturated-activations",),
            unscaled_tanh_torch,
            "tanh MLP with N(0, 1) hidden weights",
        ),
        SetUp(
            "tanh-tiny-gain",
            T,
            ("activations-vanishing",),
            tiny_gain,
            "10-layer tanh MLP, Kaiming with gain 0.5 instead of 5/3",
        ),
        SetUp(
            "plumb-tanh-tiny-gain",
            P,
            ("activations-vanishing",),
            plumb_run(n_layers=10, norm="none", gain=0.5, n_hidden=100),
            "plumb 10-layer tanh MLP, no norm, gain 0.5",
        ),
        SetUp(
            "linear-big-gain",
            T,
            ("activations-exploding",),
            deep_linear_big_gain,
            "10-layer linear MLP (no nonlinearity), gain 1.5 instead of 1",
        ),
        SetUp(
            "relu-big-gain",
            T,
            ("gradients-exploding",),
            relu_big_gain,
            "10-layer ReLU MLP, Kaiming with gain 2.5 instead of sqrt(2)",
        ),
        SetUp(
            "sigmoid-deep",
            T,
            ("gradients-vanishing",),
            deep_sigmoid,
            "10-layer sigmoid MLP, torch default init",
        ),
        SetUp(
            "relu-negative-bias",
            T,
            ("dead-units",),
            neg_bias,
            "ReLU MLP with biases initialised to -3",
        ),
        SetUp(
            "zero-init",
            T,
            ("symmetric-weights",),
            zero_init,
            "tanh MLP with every weight and bias zero",
        ),
        SetUp(
            "lr-10x-high",
            T,
            ("lr-too-high",),
            relu_lr(0.5),
            "Kaiming ReLU MLP at lr 0.5 (healthy 0.05)",
        ),
        SetUp(
            "lr-1000x-low-momentum",
            T,
            ("lr-too-low",),
            relu_lr(5e-5),
            "Kaiming ReLU MLP, SGD momentum at lr 5e-5 (healthy 0.05)",
        ),
        SetUp(
            "lr-1000x-low",
            P,
            ("lr-too-low",),
            plumb_run(lr=1e-4, preset="lecture-deep"),
            "lecture-deep at lr 1e-4 (the lecture's 0.1 / 1000)",
        ),
        SetUp(
            "adamw-lr-1000x-low",
            T,
            ("lr-too-low",),
            adamw_lr(1e-6),
            "AdamW at 1e-6 instead of 1e-3",
        ),
        SetUp(
            "adamw-lr-100x-high",
            T,
            ("lr-too-high",),
            adamw_lr(1e-1),
            "AdamW at 1e-1 instead of 1e-3",
        ),
        SetUp(
            "nan-huge-lr",
            T,
            ("non-finite",),
            nan_lr,
            "ReLU MLP at lr 50 (1000x): the loss overflows to NaN",
        ),
        SetUp(
            "plumb-bias-before-bn",
            P,
            ("redundant-bias",),
            plumb_run(preset="lecture-deep", bias="always"),
            "lecture-deep with a bias in every Linear before its BatchNorm",
        ),
        SetUp(
            "torch-bias-before-bn",
            T,
            ("redundant-bias",),
            bias_before_bn,
            "Linear(bias=True) -> BatchNorm1d",
        ),
        SetUp(
            "bn-train-mode-in-eval",
            T,
            ("batchnorm-train-mode-in-eval",),
            frozen_bn,
            "a frozen BatchNorm backbone run under no_grad but left in train mode",
        ),
        SetUp(
            "bn-eval-mode-in-training",
            T,
            ("batchnorm-eval-mode-in-training",),
            bn_eval_mode,
            "a BatchNorm MLP trained after model.eval()",
        ),
        SetUp(
            "raw-pixels",
            T,
            ("unnormalized-inputs",),
            cnn_run(raw=True),
            "the CNN fed raw 0-255 pixels",
        ),
        SetUp(
            "double-softmax",
            T,
            ("double-softmax",),
            cnn_run(softmax=True),
            "the CNN ends in Softmax and trains with cross_entropy",
        ),
        SetUp(
            "uneven-init-scale",
            T,
            ("uneven-updates",),
            uneven,
            "BatchNorm MLP with one Linear initialised 30x too large",
        ),
    ]


# --- the zoo: real architectures with their usual recipes, and faults injected ---------
def gpt(init_std: float = 0.02, lr: float = 1e-3, seed: int = 0):
    """nanoGPT's character-level recipe: AdamW, betas (0.9, 0.99), weight decay 0.1."""

    def build():
        m = zoo.GPT(zoo.GPTConfig(), init_std=init_std, seed=seed)
        opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.1)
        return m, zoo.text_windows(), zoo.sequence_loss, opt

    return build


def rnn(cell: str = "rnn", lr: float = 5e-4, recurrent_std: float | None = None):
    """makemore's recipe: AdamW 5e-4, weight decay 0.01, batch 32."""

    def build():
        m = zoo.RNNLM(cell=cell)
        if recurrent_std is not None:
            with torch.no_grad():
                for mod in m.cell.modules():
                    if isinstance(mod, nn.Linear):
                        mod.weight.normal_(0, recurrent_std)
        opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
        return m, zoo.name_sequences(), zoo.sequence_loss, opt

    return build


def cnn_recipe(lr: float = 0.05, raw: bool = False, softmax: bool = False, eval_mode: bool = False):
    """The usual image recipe: SGD, momentum 0.9, weight decay 5e-4."""

    def build():
        m = zoo.cnn_bn(softmax=softmax)
        if eval_mode:
            m.eval()  # left in eval mode after a validation pass
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        return m, strokes(raw=raw), F.cross_entropy, opt

    return build


def resmlp(lr: float = 1e-3, branch_bias: float | None = None):
    def build():
        m = zoo.ResMLP()
        if branch_bias is not None:
            with torch.no_grad():
                for block in m.blocks:
                    block[1].bias.fill_(branch_bias)
        return m, blobs(), F.cross_entropy, torch.optim.AdamW(m.parameters(), lr=lr)

    return build


def user_loop(
    model,
    batches,
    loss_fn,
    opt,
    mon,
    steps,
    *,
    zero_grad=True,
    before=None,
    before_step=None,
    after=None,
) -> None:
    """A user's training loop: [before(i)], forward, loss, [zero_grad], backward,
    [before_step(i)], step, [after(i)], ``mon.step(loss)``; the loops below are its
    variants."""
    for i in range(steps):
        if before is not None:
            before(i)
        x, y = batches()
        loss = loss_fn(model(x), y)
        if zero_grad:
            opt.zero_grad()
        loss.backward()
        if before_step is not None:
            before_step(i)
        opt.step()
        if after is not None:
            after(i)
        mon.step(loss)


def no_zero_grad(model, batches, loss_fn, opt, mon, steps) -> None:
    """A loop that forgets ``optimizer.zero_grad()``: gradients pile up."""
    user_loop(model, batches, loss_fn, opt, mon, steps, zero_grad=False)


def validates_in_train_mode(model, batches, loss_fn, opt, mon, steps) -> None:
    """A loop that evaluates under no_grad every 10 steps but never calls model.eval()."""
    model.train()
    for i in range(steps):
        user_loop(model, batches, loss_fn, opt, mon, 1)
        if i % 10 == 9:
            xv, yv = batches()
            with torch.no_grad():
                loss_fn(model(xv), yv)


def first_of_tuple_loss(out: tuple[Tensor, Any], targets: Tensor) -> Tensor:
    """The LSTM's loss: cross-entropy of the logits its ``(logits, state)`` carries."""
    return zoo.sequence_loss(out[0], targets)


def output_logits_loss(out: Any, targets: Tensor) -> Tensor:
    """The Llama's loss: cross-entropy of ``out.logits`` (a ``CausalLMOutput``)."""
    return zoo.sequence_loss(out.logits, targets)


def softmax_then_ce(out: Tensor, targets: Tensor) -> Tensor:
    """The bug: probabilities handed to cross_entropy, which applies softmax again."""
    return F.cross_entropy(F.softmax(out, dim=1), targets)


def probs_then_ce(out: Any, targets: Tensor) -> Tensor:
    """The bug after the model: ``probs = softmax(model(x).logits)`` fed to the loss."""
    return output_logits_loss(type(out)(F.softmax(out.logits, -1)), targets)


def sigmoid_then_bce(out: Tensor, targets: Tensor) -> Tensor:
    """The bug: sigmoid probabilities handed to a loss that applies sigmoid itself."""
    return F.binary_cross_entropy_with_logits(
        torch.sigmoid(out), F.one_hot(targets, out.shape[1]).float()
    )


def summed_ce(out: Tensor, targets: Tensor) -> Tensor:
    """The bug: a summed loss trained with an lr meant for the mean."""
    return F.cross_entropy(out, targets, reduction="sum")


def shuffled(batches: Callable[[], tuple[Tensor, Tensor]], seed: int = 0):
    """The bug: targets permuted apart from their inputs (shuffled separately)."""
    g = torch.Generator().manual_seed(seed)

    def draw() -> tuple[Tensor, Tensor]:
        x, y = batches()
        return x, y[torch.randperm(y.shape[0], generator=g)]

    return draw


def lstm(lr: float = 2e-3, dropout: float = 0.1, head_in_optimizer: bool = True):
    """An LSTM LM returning (logits, state), AdamW 2e-3 (makemore's data)."""

    def build():
        m = zoo.LSTMLM(dropout=dropout)
        keep = [p for n, p in m.named_parameters() if head_in_optimizer or "lm_head" not in n]
        opt = torch.optim.AdamW(keep, lr=lr, weight_decay=0.01)
        return m, zoo.name_sequences(), first_of_tuple_loss, opt

    return build


def llama(lr: float = 1e-3, freeze_first: bool = False):
    """The Llama-style decoder (returns a CausalLMOutput), AdamW 1e-3, weight decay 0.1."""

    def build():
        m = zoo.Llama()
        if freeze_first:  # meant to freeze the embeddings, froze the first block too
            for p in [*m.tok.parameters(), *m.layers[0].parameters()]:
                p.requires_grad_(False)
        opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        return m, zoo.text_windows(), output_logits_loss, opt

    return build


def resmlp_sgd():
    """The residual MLP under SGD momentum 0.9, lr 0.05 (a mean loss's lr)."""
    m, data, loss, _ = resmlp()()
    return m, data, loss, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)


def llama_std_1():
    """The Llama initialised N(0, 1) (no 0.02): logits of std ~7 at the start."""

    def build():
        m, data, loss, opt = llama()()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.Linear | nn.Embedding):
                    mod.weight.normal_(0.0, 1.0)
        return m, data, loss, opt

    return build


def variant(
    build: Build,
    *,
    loss: Callable | None = None,
    data: Callable | None = None,
    then: Callable[[nn.Module], Any] | None = None,
) -> Build:
    """A recipe with one thing changed: its loss function, its batches (``data`` wraps
    them), or its model after the optimizer was built (``then``)."""

    def changed():
        m, batches, loss_fn, opt = build()
        if then is not None:
            then(m)
        return m, data(batches) if data else batches, loss or loss_fn, opt

    return changed


def replace_head(m: nn.Module) -> None:
    """The GPT's head re-created after the optimizer was built (to change it, or re-tie
    it): the new head's weight is in no optimizer."""
    m.lm_head = nn.Linear(m.config.n_embd, m.config.vocab_size, bias=False)


def convlm(lr: float = 2e-3, detach: bool = False):
    def build():
        m = zoo.CausalConvLM(detach=detach)
        return m, zoo.text_windows(), zoo.sequence_loss, torch.optim.AdamW(m.parameters(), lr=lr)

    return build


def vit(lr: float = 1e-3, dropout: float = 0.0):
    def build():
        m = zoo.PatchTransformer(dropout=dropout)
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.05)
        return m, strokes(), F.cross_entropy, opt

    return build


def scheduler_per_batch(model, batches, loss_fn, opt, mon, steps) -> None:
    """A loop that steps a per-epoch StepLR (step_size 30 epochs) after every batch."""
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    user_loop(model, batches, loss_fn, opt, mon, steps, after=lambda i: sched.step())


def clips_every_step(model, batches, loss_fn, opt, mon, steps) -> None:
    """A loop that clips the gradient norm at 1e-3 (meant 1.0) before every step."""
    clip = lambda i: nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # noqa: E731
    user_loop(model, batches, loss_fn, opt, mon, steps, before_step=clip)


def warmup_cosine(model, batches, loss_fn, opt, mon, steps) -> None:
    """nanoGPT's schedule: linear warm-up over a tenth of the steps, cosine to lr/10."""
    peak, warm = opt.param_groups[0]["lr"], max(steps // 10, 1)

    def set_lr(i: int) -> None:
        if i < warm:
            lr = peak * (i + 1) / warm
        else:
            lr = peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (i - warm) / (steps - warm))))
        for g in opt.param_groups:
            g["lr"] = lr

    user_loop(model, batches, loss_fn, opt, mon, steps, before=set_lr)


def _zoo2() -> list[SetUp]:
    """Four more architectures (an LSTM returning a tuple, a Llama returning an output
    object, a causal-conv LM, a patch transformer) and the faults of issue 20's families:
    parameters that never train, a model that learns nothing from its inputs, the loss
    expression, the lr under schedules."""
    Z = "zoo"
    return [
        SetUp("lstm-adamw", Z, (), lstm(), "LSTM LM returning (logits, state), AdamW 2e-3"),
        SetUp("llama-adamw", Z, (), llama(), "Llama-style decoder returning .logits, AdamW"),
        SetUp("convlm-adamw", Z, (), convlm(), "dilated causal-conv LM, AdamW 2e-3"),
        SetUp("vit-adamw", Z, (), vit(), "patch transformer (pre-LN), AdamW 1e-3"),
        SetUp(
            "gpt-warmup-cosine",
            Z,
            (),
            gpt(),
            "the GPT under warm-up + cosine in its own loop",
            steps=300,
            loop=warmup_cosine,
        ),
        SetUp(
            "llama-init-std-1-in-loop",
            Z,
            ("overconfident-init",),
            llama_std_1(),
            "the Llama initialised N(0, 1), trained in the user's loop (huge initial logits)",
            steps=60,
            loop=user_loop,
        ),
        SetUp(
            "lstm-head-not-in-optimizer",
            Z,
            ("untrained-parameters",),
            lstm(head_in_optimizer=False),
            "the LSTM's optimizer built without lm_head",
        ),
        SetUp(
            "gpt-head-replaced-after-optimizer",
            Z,
            ("untrained-parameters",),
            variant(gpt(), then=replace_head),
            "the GPT's head re-created after the optimizer was built",
        ),
        SetUp(
            "llama-frozen-by-mistake",
            Z,
            ("untrained-parameters",),
            llama(freeze_first=True),
            "the Llama's embeddings and first block set requires_grad=False, optimizer "
            "over model.parameters()",
        ),
        SetUp(
            "convlm-detach",
            Z,
            ("untrained-parameters",),
            convlm(detach=True),
            "the conv LM's forward detaches the embedding output",
        ),
        SetUp(
            "llama-shuffled-targets",
            Z,
            ("not-learning",),
            variant(llama(), data=shuffled),
            "the Llama trained on targets shuffled apart from their inputs",
        ),
        SetUp(
            "resmlp-shuffled-targets",
            Z,
            ("not-learning",),
            variant(resmlp(), data=shuffled),
            "the residual MLP trained on labels shuffled apart from their inputs",
        ),
        SetUp(
            "vit-dropout-0.9",
            Z,
            ("not-learning",),
            vit(dropout=0.9),
            "the patch transformer with dropout 0.9 (meant 0.1)",
        ),
        SetUp(
            "cnn-softmax-in-loss",
            Z,
            ("double-softmax",),
            variant(cnn_recipe(), loss=softmax_then_ce),
            "the CNN's loss is cross_entropy(softmax(logits), y)",
        ),
        SetUp(
            "llama-probs-after-model",
            Z,
            ("double-softmax",),
            variant(llama(), loss=probs_then_ce),
            "the Llama's loop applies softmax to .logits, then cross_entropy",
        ),
        SetUp(
            "resmlp-sigmoid-into-bce",
            Z,
            ("double-sigmoid",),
            variant(resmlp(), loss=sigmoid_then_bce),
            "the residual MLP's one-vs-rest loss: BCE-with-logits of sigmoid(logits)",
        ),
        SetUp(
            "resmlp-summed-loss-sgd",
            Z,
            ("loss-summed",),
            variant(resmlp_sgd, loss=summed_ce),
            "the residual MLP's loss summed over the batch, with SGD's lr for the mean",
        ),
        SetUp(
            "resmlp-sgd-clipped-every-step",
            Z,
            ("gradients-clipped",),
            resmlp_sgd,
            "the residual MLP under SGD, gradients clipped to norm 1e-3 at every step",
            steps=300,
            loop=clips_every_step,
        ),
        SetUp(
            "resmlp-scheduler-per-batch",
            Z,
            ("lr-too-low",),
            resmlp(),
            "the residual MLP's per-epoch StepLR stepped every batch",
            steps=300,
            loop=scheduler_per_batch,
        ),
    ]


def _zoo() -> list[SetUp]:
    Z = "zoo"
    return [
        SetUp("gpt-adamw", Z, (), gpt(), "pre-LN GPT, tied weights, SDPA, AdamW 1e-3 (nanoGPT)"),
        SetUp("rnn-adamw", Z, (), rnn("rnn"), "makemore RNN (torch.tanh cell), AdamW 5e-4"),
        SetUp("gru-adamw", Z, (), rnn("gru"), "makemore GRU (sigmoid/tanh gates), AdamW 5e-4"),
        SetUp(
            "cnn-bn-sgd-momentum",
            Z,
            (),
            cnn_recipe(),
            "CNN with BatchNorm2d, SGD momentum 0.9 lr 0.05, weight decay",
        ),
        SetUp("resmlp-adamw", Z, (), resmlp(), "pre-norm residual MLP, AdamW 1e-3"),
        SetUp(
            "gpt-init-std-1",
            Z,
            ("overconfident-init",),
            gpt(init_std=1.0),
            "the GPT initialised N(0, 1) instead of N(0, 0.02) (tied output weight)",
        ),
        SetUp("gpt-lr-100x", Z, ("lr-too-high",), gpt(lr=1e-1), "the GPT at AdamW 1e-1"),
        SetUp("gpt-lr-1e-4x", Z, ("lr-too-low",), gpt(lr=1e-7), "the GPT at AdamW 1e-7"),
        SetUp(
            "gpt-no-zero-grad",
            Z,
            ("gradients-accumulating",),
            gpt(),
            "the GPT's loop without optimizer.zero_grad()",
            loop=no_zero_grad,
        ),
        SetUp(
            "rnn-init-std-1",
            Z,
            ("saturated-activations",),
            rnn("rnn", recurrent_std=1.0),
            "the RNN cell's weights N(0, 1) (no 1/sqrt(fan_in)) into torch.tanh",
        ),
        SetUp("rnn-lr-1e-4x", Z, ("lr-too-low",), rnn("rnn", lr=5e-8), "the RNN at AdamW 5e-8"),
        SetUp("gru-lr-100x", Z, ("lr-too-high",), rnn("gru", lr=5e-2), "the GRU at AdamW 5e-2"),
        SetUp(
            "cnn-bn-left-in-eval",
            Z,
            ("batchnorm-eval-mode-in-training",),
            cnn_recipe(eval_mode=True),
            "the CNN trained after model.eval()",
        ),
        SetUp(
            "cnn-validates-in-train-mode",
            Z,
            ("batchnorm-train-mode-in-eval",),
            cnn_recipe(),
            "the CNN's loop validates under no_grad without model.eval()",
            loop=validates_in_train_mode,
        ),
        SetUp(
            "cnn-raw-pixels",
            Z,
            ("unnormalized-inputs",),
            cnn_recipe(raw=True),
            "the CNN fed 0-255 pixels",
        ),
        SetUp(
            "cnn-softmax-into-ce",
            Z,
            ("double-softmax",),
            cnn_recipe(softmax=True),
            "the CNN ends in Softmax and trains with cross_entropy",
        ),
        SetUp(
            "cnn-lr-100x", Z, ("lr-too-high",), cnn_recipe(lr=5.0), "the CNN at SGD momentum lr 5"
        ),
        SetUp(
            "resmlp-dead-relu",
            Z,
            ("dead-units",),
            resmlp(branch_bias=-3.0),
            "the residual MLP's branch ReLUs behind biases of -3",
        ),
        SetUp(
            "resmlp-no-zero-grad",
            Z,
            ("gradients-accumulating",),
            resmlp(),
            "the residual MLP's loop without optimizer.zero_grad()",
            loop=no_zero_grad,
        ),
    ]


SETUPS: list[SetUp] = _setups() + _zoo() + _zoo2()

#: What a broken set-up yields besides its own code, each a consequence of the one fault
#: (not a second fault the doctor imagines): {set-up: (codes, why)}. The tests hold each
#: broken set-up to exactly its code plus these; any other code is a false finding.
CONSEQUENCES: dict[str, tuple[tuple[str, ...], str]] = {
    "relu-negative-bias": (
        ("untrained-parameters", "not-learning"),
        "a layer whose units are all dead passes no gradient, so the weights feeding it "
        "never change, and nothing of the input reaches the output",
    ),
    "resmlp-dead-relu": (
        ("untrained-parameters",),
        "a branch whose units are all dead passes no gradient: its weights never change",
    ),
    "adamw-lr-1000x-low": (
        ("not-learning",),
        "weights that barely move leave the model at the input-free baseline",
    ),
    "zero-init": (
        ("untrained-parameters", "not-learning"),
        "zero weights pass a zero gradient to the layers below them: those never change, "
        "and the model predicts only the class frequencies",
    ),
    "tanh-tiny-gain": (
        ("gradients-vanishing", "not-learning"),
        "activations that shrink with depth shrink the gradients too; what reaches the "
        "output carries nothing of the input, so the loss sits at the frequencies",
    ),
    "sigmoid-deep": (
        ("not-learning",),
        "no gradient reaches the early layers: the model learns only the class frequencies",
    ),
    "bn-train-mode-in-eval": (
        ("untrained-parameters",),
        "its backbone is frozen on purpose and handed to the optimizer: named as info",
    ),
    "resmlp-summed-loss-sgd": (
        ("non-finite",),
        "the summed loss acts as a 64x larger lr under SGD: the steps diverge",
    ),
    "gpt-lr-100x": (
        ("not-learning",),
        "the first steps' overshoot leaves the model at the input-free baseline",
    ),
    "lecture-unscaled-output": (
        ("lr-too-high",),
        "logits of std ~10 give the output layer gradients ~10x too large: its first "
        "updates are far above 1e-3 of its weights",
    ),
    "plumb-tanh-tiny-gain": (
        ("gradients-vanishing", "lr-too-low"),
        "vanishing activations and gradients make every update tiny next to its weights",
    ),
    "linear-big-gain": (
        ("gradients-exploding", "overconfident-init"),
        "a linear stack that grows its activations grows its gradients and its logits",
    ),
    "relu-big-gain": (
        ("activations-exploding", "overconfident-init"),
        "the same gain that explodes the gradients explodes activations and logits",
    ),
    "lr-10x-high": (("non-finite",), "the too-large steps diverge to inf/NaN"),
    "nan-huge-lr": (
        ("activations-exploding", "gradients-exploding"),
        "on the way to NaN, activations and gradients blow up first",
    ),
    "raw-pixels": (("overconfident-init",), "inputs of scale 255 give logits of scale ~100"),
    "gru-lr-100x": (
        ("saturated-activations",),
        "too-large steps drive the gates into saturation",
    ),
    "cnn-lr-100x": (
        ("dead-units",),
        "too-large steps push ReLU units where they never fire again",
    ),
}


def consequences(name: str) -> set[str]:
    """The codes set-up ``name`` may yield besides its own (``CONSEQUENCES``)."""
    return set(CONSEQUENCES.get(name, ((), ""))[0])


def run_setup(setup: SetUp) -> Outcome:
    model, batches, loss_fn, opt = setup.build()
    t0 = time.perf_counter()
    if setup.loop is None:  # broken set-ups: each fix measured (verify)
        diag = diagnose(model, batches, loss_fn, opt, steps=setup.steps, verify=bool(setup.expect))
    else:
        with Monitor(model, optimizer=opt, doctor=True) as mon:
            setup.loop(model, batches, loss_fn, opt, mon, setup.steps)
        diag = mon.diagnosis
        if setup.expect and setup.loop is user_loop:  # a plain loop: replayed fresh
            m, b, l, o = setup.build()
            diag = diag.verify(m, o, b, l, steps=setup.steps)
    problems = {f.code for f in diag.findings if f.severity in ("error", "warning")}
    return Outcome(setup, diag.codes, problems, time.perf_counter() - t0, diag.findings, diag)


def run_catalogue(names: list[str] | None = None) -> list[Outcome]:
    chosen = [s for s in SETUPS if names is None or s.name in names]
    return [run_setup(s) for s in chosen]


def _fix_cell(o: Outcome) -> str:
    v = o.fix
    if not o.setup.expect:
        return ""
    if v is None:
        replayed = o.setup.loop in (None, user_loop)
        return "no mechanical fix" if replayed else "(the user's loop: not replayed)"
    change = (
        "diverged -> finite"
        if v["change"] == -math.inf
        else "both diverge"
        if not math.isfinite(v["change"])
        else f"{v['change']:+.3g} nats"
    )
    return f"{change}{'' if v['helped'] else ' (no gain)'}"


def repair_rate(outcomes: list[Outcome]) -> tuple[int, int, int]:
    """(repaired, measured, broken): broken set-ups whose own finding's fix measurably
    helped, whose fix could be applied and measured, and all broken set-ups."""
    broken = [o for o in outcomes if o.setup.expect]
    measured = [o for o in broken if o.fix is not None]
    return sum(o.fix["helped"] for o in measured), len(measured), len(broken)


def confusion_table(outcomes: list[Outcome]) -> str:
    """One row per set-up: expected codes, found codes (warning/error; info in
    parentheses), whether it passed, and for a broken set-up the measured effect of its
    finding's fix on held-out loss (``diagnose(verify=True)``)."""
    lines = [f"{'set-up':34s} {'family':8s} {'expected':32s} {'found':s}"]
    for o in outcomes:
        exp = ", ".join(o.setup.expect) or "(healthy)"
        infos = sorted(o.codes - o.problems)
        found = ", ".join(sorted(o.problems)) or "-"
        if infos:
            found += "  (" + ", ".join(infos) + ")"
        mark = "ok " if o.passed else "FALSE ALARM" if not o.setup.expect or o.extra else "MISS"
        fix = _fix_cell(o)
        lines.append(
            f"{o.setup.name:34s} {o.setup.family:8s} {exp:32s} {found}  [{mark}]"
            + (f"  fix: {fix}" if fix else "")
        )
    broken = [o for o in outcomes if o.setup.expect]
    healthy = [o for o in outcomes if not o.setup.expect]
    lines.append(
        f"broken: {sum(o.passed for o in broken)}/{len(broken)} found their code; "
        f"healthy: {sum(o.passed for o in healthy)}/{len(healthy)} without a warning"
    )
    repaired, measured, total = repair_rate(outcomes)
    if total:
        lines.append(
            f"fixes: {repaired}/{measured} measured fixes lowered held-out loss "
            f"(3 standard errors and 2%); {measured}/{total} broken set-ups have a fix "
            "plumb can apply and measure"
        )
    return "\n".join(lines)
