"""plumb's doctor on a PyTorch Lightning fit: a small GPT on the names text.

    python examples/lightning_doctor.py                      # healthy: no warning
    python examples/lightning_doctor.py --fault frozen-block # a block left out of the optimizer
    python examples/lightning_doctor.py --devices 2          # DDPStrategy, 2 gloo processes

Runs on the CPU in well under a minute. The report lands in <log_dir>/plumb/report.html
and the per-layer scalars in the logger (here a CSVLogger: <log_dir>/metrics.csv).
Needs `pip install 'plumb[lightning]'`.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

import plumb.lightning
from plumb.zoo import GPT, GPTConfig, sequence_loss, text_windows


class LitGPT(pl.LightningModule):
    def __init__(self, lr: float, fault: str):
        super().__init__()
        self.gpt = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
        self.lr, self.fault = lr, fault

    def forward(self, idx):
        return self.gpt(idx)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = sequence_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", sequence_loss(self(x), y))

    def configure_optimizers(self):
        params = self.parameters()
        if self.fault == "frozen-block":  # the mistake: the first block is never trained
            skip = {id(p) for p in self.gpt.transformer.h[0].parameters()}
            params = [p for p in self.parameters() if id(p) not in skip]
        lr = self.lr * (100 if self.fault == "lr-x100" else 1)
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def loader(n: int, seed: int) -> torch.utils.data.DataLoader:
    draw = text_windows(block=16, batch=1, seed=seed)
    pairs = [tuple(t[0] for t in draw()) for _ in range(n)]
    return torch.utils.data.DataLoader(pairs, batch_size=16, shuffle=False)


def main(argv: list[str] | None = None):
    """Train as the flags say; returns the callback (its ``diagnosis``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--fault", choices=("none", "frozen-block", "lr-x100"), default="none")
    p.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, ...")
    p.add_argument("--out", default="runs/lightning")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = LitGPT(lr=3e-3, fault=args.fault)
    doctor = plumb.lightning.Doctor(every=10)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        precision=args.precision,
        logger=CSVLogger(args.out),
        callbacks=[doctor],
        val_check_interval=min(50, args.steps * args.accumulate),
        limit_val_batches=4,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    n = 16 * args.steps * args.accumulate * args.devices  # each rank: steps x accumulate batches
    trainer.fit(model, loader(n, 0), loader(64, 1))
    return doctor


if __name__ == "__main__":
    main()
