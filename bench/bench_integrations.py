"""Cost of the framework callbacks at their default cadence: seconds per optimizer step of
a small GPT trained by PyTorch Lightning and by the Hugging Face Trainer, with and
without plumb's Doctor callback, CPU, 1 thread.

    lightning   plumb.zoo.GPT (4 pre-LN blocks, n_embd 64, tied weights), 16 x 32
                characters, AdamW 1e-3, Trainer(max_steps=N), logger off
    hf          GPT2LMHeadModel from a config (4 layers, n_embd 64), 16 x 32 characters,
                Trainer(max_steps=N), report_to none

Each round fits once with the callback and once without, alternating, so that drift in
machine speed hits both alike. A step is timed from the framework's step-begin hook to its
step-end hook (the timer runs after plumb's callback, so plumb's work in the step is
inside it); the figure per fit is the mean and the median over its steps, and the ratio
is with / without, over rounds. Target (issue 22): both ratios <= 1.05.

    python bench/bench_integrations.py [--steps 300] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings

import torch

from plumb import zoo


def lightning_fit(steps: int, doctor: bool) -> list[float]:
    import lightning.pytorch as pl

    import plumb.lightning

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.gpt = zoo.GPT(zoo.GPTConfig(), seed=1)

        def training_step(self, batch, i):
            x, y = batch
            return zoo.sequence_loss(self.gpt(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    times: list[float] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, *a):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *a):
            times.append(time.perf_counter() - self.t0)

    draw = zoo.text_windows(seed=1)
    batches = [draw() for _ in range(steps)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with tempfile.TemporaryDirectory() as d:
        callbacks = [plumb.lightning.Doctor(out=d)] if doctor else []
        trainer = pl.Trainer(
            accelerator="cpu", max_steps=steps, logger=False, callbacks=[*callbacks, Timer()],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=d,
        )  # fmt: skip
        trainer.fit(Lit(), loader)
    return times[5:]  # the first steps warm up allocators and caches


def hf_fit(steps: int, doctor: bool) -> list[float]:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    import plumb.hf

    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    draw = zoo.text_windows(seed=1)
    data = [{"input_ids": x, "labels": x.clone()} for x in draw()[0]] * steps
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=27, n_positions=32, n_embd=64, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0)  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(
            output_dir=d, max_steps=steps, per_device_train_batch_size=16, learning_rate=1e-3,
            save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=10**6,
        )  # fmt: skip
        callbacks = [plumb.hf.Doctor(out=d)] if doctor else []
        Trainer(
            model=GPT2LMHeadModel(config), args=args, train_dataset=data,
            callbacks=[*callbacks, Timer()],
        ).train()  # fmt: skip
    return times[5:]


FRAMEWORKS = {"lightning": lightning_fit, "hf": hf_fit}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--frameworks", default="lightning,hf")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    result = {}
    for name in args.frameworks.split(","):
        fit = FRAMEWORKS[name]
        fit(20, True)  # warm: imports, first allocations
        means: dict[bool, list[float]] = {True: [], False: []}
        medians: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for doctor in (False, True):
                t = fit(args.steps, doctor)
                means[doctor].append(statistics.fmean(t))
                medians[doctor].append(statistics.median(t))
        mean_ratio = statistics.median(
            a / b for a, b in zip(means[True], means[False], strict=True)
        )
        median_ratio = statistics.median(a / b for a, b in zip(medians[True], medians[False], strict=True))  # fmt: skip
        result[name] = {
            "ms_per_step_without": 1e3 * statistics.median(means[False]),
            "ms_per_step_with": 1e3 * statistics.median(means[True]),
            "mean_ratio": mean_ratio,
            "median_ratio": median_ratio,
        }
        r = result[name]
        print(
            f"{name:>10}: {r['ms_per_step_without']:.2f} ms/step without, "
            f"{r['ms_per_step_with']:.2f} with plumb.{name}.Doctor: mean {mean_ratio:.3f}x, "
            f"median {median_ratio:.3f}x (target <= 1.05)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
