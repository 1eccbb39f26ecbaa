"""plumb's doctor on a Hugging Face Trainer run: a small GPT-2 built from a config (no
download) on the names text, with gradient accumulation.

    python examples/hf_trainer_doctor.py                       # healthy: no warning
    python examples/hf_trainer_doctor.py --fault frozen-block  # a block left out of the optimizer
    python examples/hf_trainer_doctor.py --report-to mlflow    # scalars and findings in MLflow too

Runs on the CPU in well under a minute; the report lands in OUTPUT_DIR/report.html.
Needs `pip install 'plumb[hf]'` (and 'plumb[wandb]' / 'plumb[mlflow]' for --report-to).
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import plumb.hf
from plumb.zoo import text_windows


def dataset(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    draw = text_windows(block=16, batch=1, seed=seed)
    out = []
    for _ in range(n):
        x, _ = draw()
        out.append({"input_ids": x[0], "labels": x[0].clone()})  # the model shifts labels
    return out


class FrozenBlockTrainer(Trainer):
    """The mistake: an optimizer built over all parameters but the first block's."""

    def create_optimizer(self):
        skip = {id(p) for p in self.model.transformer.h[0].parameters()}
        params = [p for p in self.model.parameters() if id(p) not in skip]
        self.optimizer = torch.optim.AdamW(params, lr=self.args.learning_rate)
        return self.optimizer


def main(argv: list[str] | None = None):
    """Train as the flags say; returns the callback (its ``diagnosis``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--accumulate", type=int, default=2)
    p.add_argument("--fault", choices=("none", "frozen-block"), default="none")
    p.add_argument(
        "--report-to", default="none", help="none, or wandb, mlflow, tensorboard (comma-separated)"
    )
    p.add_argument("--out", default="runs/hf")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=27,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    targs = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=args.accumulate,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        logging_steps=25,
        save_strategy="no",
        report_to=[] if args.report_to == "none" else args.report_to.split(","),
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    cls = FrozenBlockTrainer if args.fault == "frozen-block" else Trainer
    doctor = plumb.hf.Doctor(every=10)
    trainer = cls(
        model=model,
        args=targs,
        train_dataset=dataset(8 * args.accumulate * args.steps, 0),
        callbacks=[doctor],
    )
    trainer.train()
    return doctor


if __name__ == "__main__":
    main()
