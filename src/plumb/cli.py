"""``plumb`` command line: parses arguments and calls the library (see pipeline.py).

User mistakes print one line, ``plumb: error: ...``, and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from plumb.errors import PlumbError

EPILOG_TRAIN = """examples:
  plumb train                                   # lecture-deep, 200k steps, bundled names
  plumb train --steps 20000 --lr-decay-step 15000 --out runs/quick
  plumb train --preset lecture-mlp:batchnorm --threads 1
  plumb train --data words.txt --n-layers 2 --norm layer --activation relu --optimizer adamw --lr 1e-3
"""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2, as argparse uses), with
    "did you mean" for a misspelt flag or command, and no abbreviations (``--step 10``
    is not silently ``--steps 10``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(
            2, f"plumb: error: {message}{self._suggest(message)} (see `{self.prog} --help`)\n"
        )

    def _suggest(self, message: str) -> str:
        import difflib
        import re

        parsers = [self]
        for a in self._actions:  # the command's own flags, for the top-level parser
            if isinstance(a, argparse._SubParsersAction):
                words = getattr(self, "_argv", None) or sys.argv[1:]
                parsers = [p for name, p in a.choices.items() if name in words] or parsers
        flags = [o for p in parsers for a in p._actions for o in a.option_strings]
        flags = [f for f in flags if f.startswith("--")]
        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            for word in m.group(1).split():
                flag = word.split("=")[0]
                if flag.startswith("--"):
                    close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.6)
                    if close:
                        return f": did you mean {close[0]}?"
        m = re.match(r"argument \w+: invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"[\w:-]+", m.group(2))
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
            if close:
                return f": did you mean {close[0]}?"
        return ""


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    from plumb.models import BIAS_POLICIES, INITS, NORMS
    from plumb.nn import ACTIVATIONS

    g = p.add_argument_group("model (defaults come from --preset)")
    g.add_argument(
        "--preset",
        default="lecture-deep",
        help="lecture-deep (default), or one of: "
        + ", ".join(n for n in _presets() if n != "lecture-deep"),
    )
    g.add_argument("--block-size", type=int, help="context length in characters (3)")
    g.add_argument("--n-embd", type=int, help="embedding dimension")
    g.add_argument("--n-hidden", type=int, help="hidden units per layer")
    g.add_argument("--n-layers", type=int, help="hidden [Linear, Norm, Act] blocks")
    g.add_argument(
        "--out-norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a norm layer after the output Linear",
    )
    g.add_argument("--init", choices=INITS, help="hidden weight init scheme")
    g.add_argument("--gain", type=float, help="init gain (default: the activation's, tanh 5/3)")
    g.add_argument("--weight-scale", type=float, help="extra factor on hidden weights")
    g.add_argument("--out-init", choices=INITS, help="output layer init scheme")
    g.add_argument(
        "--out-scale", type=float, help="output calibration factor (0.1 for lecture-deep)"
    )
    g.add_argument("--bias", choices=BIAS_POLICIES, help="auto: no bias before a norm layer")
    g.add_argument(
        "--bn-variance",
        choices=("torch", "lecture"),
        help="torch: biased var to normalise; lecture: unbiased",
    )
    g.add_argument("--bn-momentum", type=float, help="running statistics' update rate")
    g.add_argument("--bn-eps", type=float, help="added to the variance")
    g.add_argument("--bias-scale", type=float, help="factor on the hidden biases' init")
    g.add_argument("--out-bias-scale", type=float, help="factor on the output bias's init")
    g.add_argument("--norm", choices=NORMS, help="norm layer after each hidden Linear")
    g.add_argument("--activation", choices=tuple(ACTIVATIONS), help="nonlinearity")
    # every model flag shows its default: lecture-deep's value (other presets set theirs)
    from plumb.models import preset_config

    base = preset_config("lecture-deep")
    for a in g._group_actions:
        field = a.dest
        if hasattr(base, field) and a.help and "lecture-deep" not in a.help:
            value = getattr(base, field)
            shown = {True: "on", False: "off"}[value] if isinstance(value, bool) else value
            shown = "unset" if shown is None else shown
            a.help = f"{a.help} (lecture-deep: {shown})"


def _presets() -> list[str]:
    from plumb.models import PRESETS

    return list(PRESETS)


def _add_step_flags(g) -> None:
    """What one training step needs, shared by `train` and `doctor`."""
    from plumb.train import OPTIMIZERS

    g.add_argument("--data", help="UTF-8 text file, one item per line (default: bundled names)")
    g.add_argument("--batch-size", type=int, help="examples per step (32)")
    g.add_argument("--lr", type=float, help="learning rate (the preset's: 0.1)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="sgd (default) or adamw")
    g.add_argument(
        "--weight-decay",
        type=float,
        help="weight decay (0): SGD's L2 term, AdamW's decoupled decay",
    )
    g.add_argument("--seed", type=int, help="generator seed for init and batches (2147483647)")
    g.add_argument("--device", help="cpu (default), cuda, cuda:N")
    g.add_argument(
        "--threads",
        type=int,
        help="torch threads; 1 for bit-exact lecture numbers (default: torch's, the cores)",
    )


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (defaults come from --preset)")
    g.add_argument("--out", help="run directory (default: runs/PRESET-TIMESTAMP)")
    g.add_argument("--steps", type=int, help="training steps (the preset's: 200,000)")
    g.add_argument(
        "--lr-decay-step",
        type=int,
        help="step from which lr becomes --lr-final (default: the preset's fraction of "
        "--steps: 3/4 for lecture-deep, 150,000 of 200,000)",
    )
    g.add_argument("--lr-final", type=float, help="learning rate after --lr-decay-step (0.01)")
    g.add_argument(
        "--average-from",
        type=int,
        help="from this step on, average the weights (SWA); the run ends with the mean "
        "and BatchNorm recalibrated (default: the preset's; off for lecture-deep)",
    )
    g.add_argument("--average-every", type=int, help="steps between the iterates averaged (100)")
    _add_step_flags(g)
    g.add_argument(
        "--calibrate-bn",
        action="store_true",
        help="set BatchNorm running stats from the whole training set after training",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model: ~2x faster steps on CPU after a ~20 s compile; not bit-exact",
    )
    g.add_argument(
        "--engine",
        choices=("auto", "eager", "fused"),
        help="auto (default): the fused engine (whole step with a hand-written backward) "
        "for plumb's MLP: on the CPU its step in C, nothing to compile; else compiled, when "
        "the run is long enough to pay for the compile (~34,000 steps cold, ~3,000 "
        "cached); else eager; eager: autograd, bit-exact with the notebook",
    )
    g.add_argument(
        "--print-every", type=int, help="print the loss every N steps with --no-progress (10000)"
    )
    g.add_argument(
        "--eval-every",
        type=int,
        metavar="N",
        help="validation loss (eval mode) every N steps and at the end (default: steps/20)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        help="write RUN_DIR/checkpoint.safetensors every N steps (1000) and at the end",
    )
    g.add_argument(
        "--on-nonfinite",
        choices=("stop", "skip", "continue"),
        help="a NaN/Inf loss or gradient: stop (exit 3, keep the last good checkpoint; "
        "default), skip that step's update, or continue (update anyway; eager engine)",
    )
    g.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its checkpoint, to its own --steps (or a larger "
        "--steps given here); the run's config is kept",
    )
    g.add_argument("--samples", type=int, default=20, help="samples to print at the end (20)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("probes and report")
    g.add_argument(
        "--probe-every", type=int, help="record layer statistics every N steps (max(50, steps/500))"
    )
    g.add_argument("--hist-every", type=int, help="histograms every N steps (10 x --probe-every)")
    g.add_argument("--no-probes", action="store_true", help="train without probes (no report)")
    g.add_argument(
        "--no-doctor", action="store_true", help="do not run the doctor's rules while training"
    )
    g.add_argument("--no-report", action="store_true", help="do not write report.html")
    g.add_argument(
        "--tensorboard",
        nargs="?",
        const="",
        metavar="DIR",
        help="also write TensorBoard event files (default DIR: RUN_DIR/tensorboard)",
    )


def build_configs(args: argparse.Namespace, scale_decay: bool = False):
    """The model and train configs of the flags over the preset's. ``scale_decay``
    (``plumb train``): a ``--steps`` without ``--lr-decay-step`` moves the preset's lr
    decay to the same fraction of the new length (lecture-deep: 150k of 200k -> 3/4 of
    ``--steps``), so that a shorter run still decays instead of never reaching its
    preset's step; ``args._decay_scaled`` says it was. The preset's ``average_from``
    (best-10min) moves the same way."""
    from plumb.models import PRESET_TRAIN, ModelConfig, preset_config
    from plumb.train import TrainConfig

    model_over = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(ModelConfig)
        if getattr(args, f.name, None) is not None
    }
    if model_over.get("norm") == "none" and "out_norm" not in model_over:
        model_over["out_norm"] = False  # no norm type: no output norm either (not an error)
    try:
        model_cfg = preset_config(args.preset, **model_over)
    except PlumbError as e:
        raise PlumbError(_flag_names(str(e))) from None
    # the flags that change the preset, for the banner ("lecture-deep with --n-layers 2")
    base = preset_config(args.preset)
    args._changed = []
    for f in dataclasses.fields(ModelConfig):
        v = getattr(model_cfg, f.name)
        if f.name in model_over and v != getattr(base, f.name):
            flag = "--" + f.name.replace("_", "-")
            if isinstance(v, bool):
                args._changed.append(flag if v else flag.replace("--", "--no-", 1))
            else:
                args._changed.append(f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}")
    train_over = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        # `is` checks: 0 == False in Python, and a flag like --lr 0 must reach validation.
        if getattr(args, f.name, None) is not None and getattr(args, f.name) is not False
    }
    preset_train = PRESET_TRAIN.get(args.preset, {})
    args._decay_scaled = None
    if (
        scale_decay
        and "steps" in train_over
        and "lr_decay_step" not in train_over
        and preset_train.get("lr_decay_step")
        and preset_train.get("steps")
        and isinstance(train_over["steps"], int)
        and train_over["steps"] > 0
    ):
        frac = preset_train["lr_decay_step"] / preset_train["steps"]
        train_over["lr_decay_step"] = max(1, round(train_over["steps"] * frac))
        args._decay_scaled = frac
    if (
        scale_decay
        and isinstance(train_over.get("steps"), int)
        and train_over["steps"] > 0
        and "average_from" not in train_over
        and preset_train.get("average_from") is not None
    ):  # the weight average starts at the preset's fraction of the run too
        at = preset_train["average_from"] / preset_train["steps"]
        train_over["average_from"] = round(train_over["steps"] * at)
    if getattr(args, "no_probes", False):
        train_over["probes"] = False
    if getattr(args, "no_doctor", False):
        train_over["doctor"] = False
    try:
        train_cfg = TrainConfig(**{**preset_train, **train_over})
    except PlumbError as e:
        raise PlumbError(_flag_names(str(e))) from None
    return model_cfg, train_cfg


def _flag_names(message: str) -> str:
    """A config error in the words of the command line: ``batch_size must be ...`` ->
    ``--batch-size must be ...`` (the fields of ModelConfig and TrainConfig are flags)."""
    import re

    from plumb.models import ModelConfig
    from plumb.train import TrainConfig

    fields = {f.name for c in (ModelConfig, TrainConfig) for f in dataclasses.fields(c)}
    fields.discard("device")  # the same word either way; keep messages about devices as they are

    def flag(m: re.Match) -> str:
        word = m.group(0)
        return "--" + word.replace("_", "-") if word in fields and "_" in word else word

    message = re.sub(r"(?<![-\w])[a-z]+(?:_[a-z0-9]+)+(?![\w-])", flag, message)
    # a one-word field that the message is about: "lr must be ..." -> "--lr must be ..."
    first = re.match(r"([a-z]+) must\b", message)
    if first and first.group(1) in fields:
        message = "--" + message
    return message


#: train flags that --resume allows (everything else would change the run's config)
RESUME_FLAGS = {
    "resume",
    "steps",
    "data",
    "samples",
    "no_progress",
    "no_report",
    "tensorboard",
    "nproc",
}


def _resume_conflicts(args: argparse.Namespace) -> list[str]:
    return [
        "--" + dest.replace("_", "-")
        for dest, default in args._defaults.items()
        if dest not in RESUME_FLAGS and getattr(args, dest, default) != default
    ]


def cmd_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from plumb.dist import from_rank0, init_from_env
    from plumb.launch import LOST_PEERS, launch
    from plumb.pipeline import resume_configs
    from plumb.runs import finished_steps

    if args.steps is not None and args.steps < 1:
        raise PlumbError(f"--steps must be an integer >= 1, got {args.steps}")
    if args.resume is not None:
        if args.out is not None and Path(args.out) != Path(args.resume):
            raise PlumbError("--resume DIR continues DIR: drop --out (or make it the same)")
        conflicts = _resume_conflicts(args)
        if conflicts:
            raise PlumbError(
                f"--resume keeps the run's own config: drop {', '.join(conflicts)} "
                "(only --steps, --data, --samples, --no-progress, --no-report, --tensorboard, --nproc)"
            )
        out = Path(args.resume)
        ckpt, model_cfg, train_cfg, _ = resume_configs(out, args.steps, args.data)
        args._resume_step = ckpt.step
        # complete, and its outputs written (a kill between the last checkpoint and the
        # last output resumes as a zero-step run that writes them)
        if (
            ckpt.state.get("status") == "complete"
            and train_cfg.steps <= ckpt.step
            and finished_steps(out) == ckpt.step
        ):
            print(
                f"plumb: {out} is complete ({ckpt.step:,} steps): nothing to resume "
                f"(give --steps N above {ckpt.step:,} to train it further)"
            )
            return 0
    else:
        model_cfg, train_cfg = build_configs(args, scale_decay=True)
        out = Path(
            args.out or f"runs/{args.preset.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    if args.samples < 0:
        raise PlumbError(f"--samples must be >= 0, got {args.samples}")
    if args.nproc is not None and args.nproc < 1:
        raise PlumbError(f"--nproc must be an integer >= 1, got {args.nproc}")
    if args.nproc and args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if train_cfg.batch_size % args.nproc:
            raise PlumbError(
                f"--batch-size {train_cfg.batch_size} must be a multiple of --nproc {args.nproc}"
            )
        return launch(args.nproc, _launch_argv(args._argv, out), str(out))
    rank, size = init_from_env(train_cfg.device)
    if size > 1:
        out = Path(from_rank0(str(out)))  # one run directory, whatever each rank's clock said
        if rank != 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 prints, for the process
    orderly = False
    try:
        code = _train(args, model_cfg, train_cfg, out, rank)
        orderly = True
        return code
    except (RuntimeError, dist.DistError) as e:
        if size == 1:
            raise
        if os.environ.get("PLUMB_LAUNCHED"):
            return LOST_PEERS  # the launcher says what happened, once
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PlumbError(f"rank {rank} of {size} lost its peers ({first})") from None
    finally:
        if size > 1 and dist.is_initialized():
            _leave_group(orderly)


def _leave_group(orderly: bool) -> None:
    """Leave the process group while the interpreter is whole. The DDP reducer and the
    engines hold gloo work whose tensors have Python owners; freed only at interpreter
    exit, a gloo thread that takes the GIL during finalization aborts the process
    ("terminate called without an active exception", SIGABRT, about one 2-rank run in
    ten here). So: free them now (one collection), meet the other ranks (no rank shuts
    down a group another still talks to), then destroy the group."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if orderly:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def _verdict_lines(rec) -> str:
    """The run's verdict for the terminal's last lines: the headline, then each finding
    again (they were printed when found, above the progress bar) with its fix."""
    from plumb.doctor.fixes import finding_lines
    from plumb.report.html import run_headline

    lines = [f"doctor: {run_headline(rec).plain()}"]
    for f in rec.findings:
        lines += finding_lines(f, rec.config)
    return "\n".join(lines)


def _launch_argv(argv: list[str], out: Path) -> list[str]:
    """``argv`` without ``--nproc N``, with ``--out`` pinned (one directory for all ranks)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    if not any(a in ("--out", "--resume") or a.startswith(("--out=", "--resume=")) for a in rest):
        rest += ["--out", str(out)]
    return rest


def _train(args: argparse.Namespace, model_cfg, train_cfg, out: Path, rank: int) -> int:
    from plumb.pipeline import train_run

    if args.resume is not None:
        banner = (
            f"plumb: resuming {out} at step {args._resume_step:,} of {train_cfg.steps:,} "
            f"(batch {train_cfg.batch_size}, {train_cfg.optimizer}, device {train_cfg.device})"
        )
    else:
        changed = getattr(args, "_changed", [])
        banner = (
            f"plumb: training {args.preset}"
            + (f" with {' '.join(changed)}" if changed else "")
            + f" for {train_cfg.steps:,} steps "
            f"(batch {train_cfg.batch_size}, {train_cfg.optimizer} lr {train_cfg.lr:g}"
            + (
                f" -> {train_cfg.lr_final:g} at step {train_cfg.lr_decay_step:,}"
                + (
                    f", the preset's {args._decay_scaled:.0%} of the steps"
                    if getattr(args, "_decay_scaled", None)
                    else ""
                )
                if train_cfg.lr_decay_step is not None and train_cfg.lr_decay_step < train_cfg.steps
                else ", no decay"
                if train_cfg.lr_decay_step is not None
                else ""
            )
            + (
                f", weights averaged from step {train_cfg.average_from:,}"
                if train_cfg.average_from is not None and train_cfg.average_from < train_cfg.steps
                else ""
            )
            + f", device {train_cfg.device})"
        )

    def on_print(step: int, loss: float) -> None:
        if args.no_progress:
            print(f"{step:7d}/{train_cfg.steps:7d}: {loss:.4f}", flush=True)

    tensorboard = None
    if args.tensorboard is not None:
        if args.no_probes:
            raise PlumbError("--tensorboard needs the probes: drop --no-probes")
        tensorboard = Path(args.tensorboard) if args.tensorboard else out / "tensorboard"

    def on_finding(f, step: int) -> None:
        if sys.stderr.isatty() and not args.no_progress:
            sys.stderr.write("\n")  # below the progress bar's line
        print(
            f"doctor at step {step}: [{f.severity}] {f.code} @ {f.where}: {f.message}", flush=True
        )

    def on_engine(why: str) -> None:
        # the banner comes once everything is validated: nothing is printed before a refusal
        print(banner, flush=True)
        print(f"plumb: {why}", flush=True)

    run = train_run(
        model_cfg,
        train_cfg,
        out,
        args.data,
        progress=not args.no_progress,
        on_print=on_print,
        on_engine=on_engine,
        samples=args.samples,
        report=not args.no_report,
        tensorboard=tensorboard,
        on_finding=on_finding,
        resume=args.resume is not None,
        steps=args.steps,
        preset=None if args.resume is not None else args.preset,
    )
    if rank != 0:  # rank 0 reports
        return run.exit_code
    m = run.metrics
    print(
        f"parameters {m['num_parameters']:,}  step-0 loss {m['step0_loss']:.4f}  "
        f"({m['train_seconds']:.1f} s, {m['us_per_step']:.0f} us/step"
        + (f"; {m['compile_seconds']:.1f} s of it compiling" if m.get("compile_seconds") else "")
        + ")"
    )
    print("loss (eval mode): " + "  ".join(f"{k} {v:.4f}" for k, v in m["loss"].items()))
    if run.samples:
        print(f"{len(run.samples)} samples:")
        for word, where in run.samples:
            print(f"  {word}" + ("" if where in ("new", "?") else f"   (in {where} set)"))
    if train_cfg.probes:
        from plumb.record import load_run
        from plumb.report.tables import terminal_table

        rec = load_run(out)
        print(terminal_table(rec))
        if rec.doctor is not None:
            print(_verdict_lines(rec))
        if not args.no_report:
            print(f"report: {out / 'report.html'}")
    if tensorboard is not None:
        print(f"tensorboard: tensorboard --logdir {tensorboard}")
    print(f"run directory: {out}")
    if run.status == "interrupted":
        print(
            f"plumb: interrupted after step {m['steps']:,} of {train_cfg.steps:,}; checkpoint "
            f"saved. Resume with: plumb train --resume {out}",
            file=sys.stderr,
        )
    elif run.status == "diverged":
        from plumb.checkpoint import CHECKPOINT, read_checkpoint

        f = run.nonfinite
        kept = (
            f"the last good checkpoint (step {read_checkpoint(out).step:,}) is kept in {out}"
            if (out / CHECKPOINT).is_file()
            else "no checkpoint was due before it"
        )
        print(
            f"plumb: stopped at step {m['steps']:,}: [{f.severity}] {f.code} @ {f.where}: "
            f"{f.message}; {kept}",
            file=sys.stderr,
        )
    return run.exit_code


def _run_dir(args: argparse.Namespace) -> str:
    """The run directory of eval/sample: positional (as report and compare take it) or
    --run; one of them, not two different ones."""
    given = [r for r in (args.run_dir, args.run) if r is not None]
    if not given:
        raise PlumbError(f"give the run directory: plumb {args.command} RUN_DIR")
    if len(set(given)) > 1:
        raise PlumbError(f"two run directories ({given[0]} and {given[1]}): give one")
    return given[0]


def cmd_eval(args: argparse.Namespace) -> int:
    from plumb.pipeline import eval_run

    args.run = _run_dir(args)

    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    for name, value in eval_run(args.run, splits, args.device, args.data).items():
        print(f"{name} {value:.4f}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from plumb.pipeline import sample_run

    args.run = _run_dir(args)

    rows = sample_run(args.run, args.n, args.seed, args.temperature, args.top_k, args.device)
    for word, where in rows:
        print(word + ("" if where in ("new", "?") else f"   (in {where} set)"))
    counts = {k: sum(1 for _, w in rows if w == k) for k in ("train", "val", "test", "new")}
    if any(where == "?" for _, where in rows):
        print(
            "(the run's data file is gone or changed: cannot tell which samples are in the data)",
            file=sys.stderr,
        )
    else:
        print(
            f"({counts['new']} new, {counts['train']} in train, {counts['val']} in val, "
            f"{counts['test']} in test)",
            file=sys.stderr,
        )
    return 0


def cmd_lecture(args: argparse.Namespace) -> int:
    from plumb.lecture import run_lecture
    from plumb.models import LECTURE_STAGES

    stages = (
        list(LECTURE_STAGES)
        if args.stages == "all"
        else [s.strip() for s in args.stages.split(",")]
    )
    bad = [s for s in stages if s not in LECTURE_STAGES]
    if bad:
        raise PlumbError(
            f"unknown stage(s) {', '.join(bad)}: choose from {', '.join(LECTURE_STAGES)}"
        )
    if args.steps is not None and args.steps < 1:
        raise PlumbError(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 1 or (args.jobs is not None and args.jobs < 1):
        raise PlumbError("--threads and --jobs must be >= 1")
    steps = args.steps or 200_000
    print(
        f"plumb lecture: {len(stages)} stage(s) x {steps:,} steps, {args.threads} thread(s) each "
        "(published numbers: 200,000 steps; exact with 1 thread on torch 2.13.0 CPU)",
        flush=True,
    )
    header = f"{'stage':<12} {'published train':>15} {'val':>7}   {'plumb train':>11} {'val':>7}   {'diff train':>10} {'val':>7}"
    print(header)
    print("-" * len(header))

    def row(r) -> None:
        tr, va = r.compared
        ptr, pva = r.published
        print(
            f"{r.stage:<12} {ptr:>15.4f} {pva:>7.4f}   {tr:>11.4f} {va:>7.4f}   {tr - ptr:>+10.4f} {va - pva:>+7.4f}",
            flush=True,
        )
        if r.calibrated is not None:
            print(
                f"{'':<12} {'(running stats, not calibrated)':>31}   {r.train:>11.4f} {r.val:>7.4f}"
            )

    run_lecture(stages, args.data, args.steps, args.threads, args.jobs, on_result=row, echo=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from plumb.record import load_run
    from plumb.report import write_report
    from plumb.report.tables import terminal_table

    if args.watch is not None:
        return _watch(args.run_dir, args.watch)
    path = write_report(args.run_dir)
    print(terminal_table(load_run(args.run_dir)))
    print(f"report: {path}")
    if args.tensorboard is not None:
        from plumb.report.tensorboard import export_tensorboard

        logdir = export_tensorboard(args.run_dir, args.tensorboard or None)
        print(f"tensorboard: tensorboard --logdir {logdir}")
    return 0


def _watch(run_dir: str, every: float) -> int:
    """Rebuild the report every ``every`` seconds while the run trains (its lock is
    live), then once more without the reload; Ctrl-C stops watching."""
    from plumb.guard import RunLock
    from plumb.report import write_report

    if not every > 0:
        raise PlumbError(f"--watch needs a number of seconds > 0, got {every}")
    lock = RunLock(run_dir)
    refresh = max(1, round(every))
    try:
        while lock.owner() is not None:
            path = write_report(run_dir, refresh=refresh)
            print(f"report: {path} (rebuilt {time.strftime('%H:%M:%S')})", flush=True)
            time.sleep(every)
    except KeyboardInterrupt:
        pass
    path = write_report(run_dir)  # the run ended (or we stopped watching): no reload
    print(f"report: {path}")
    return 0


def default_compare_path(runs: list[str]) -> Path:
    """Beside the first run: ``PARENT/compare-A-vs-B.html`` (not the current directory,
    where pages of unrelated comparisons would pile up)."""
    names = "-vs-".join(Path(r).resolve().name for r in runs)
    if len(names) > 80:
        names = names[:80]
    return Path(runs[0]).parent / f"compare-{names}.html"


def cmd_compare(args: argparse.Namespace) -> int:
    from plumb.report.compare import write_compare

    for d in args.runs:
        if not (Path(d) / "probes" / "meta.json").is_file():
            raise PlumbError(
                f"{d} is not a run directory with a probe record (plumb train --out, or "
                "Monitor(out=...)): give run directories"
            )
    out = Path(args.out) if args.out else default_compare_path(args.runs)
    if out.is_dir():
        raise PlumbError(f"--out {out} is a directory: give a file name, e.g. {out}/compare.html")
    path = write_compare(args.runs, out)
    print(f"compare: {path}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.catalogue is not None:
        from plumb.catalogue import SETUPS, confusion_table, run_catalogue

        names = [n for n in args.catalogue.split(",") if n] or None
        unknown = sorted(set(names or []) - {s.name for s in SETUPS})
        if unknown:
            raise PlumbError(
                f"unknown set-up(s) {', '.join(unknown)}: choose from "
                + ", ".join(s.name for s in SETUPS)
            )
        outcomes = run_catalogue(names)
        print(confusion_table(outcomes))
        return 0 if all(o.passed for o in outcomes) else 1
    if args.run is not None:
        return _doctor_saved(args)
    from plumb.pipeline import doctor_run

    if not isinstance(args.steps, int) or args.steps < 1:
        raise PlumbError(f"--steps must be an integer >= 1, got {args.steps}")
    steps = args.steps
    args.steps = None  # the train config's steps: not the doctor's
    model_cfg, train_cfg = build_configs(args)
    diag = doctor_run(model_cfg, train_cfg, args.data, steps=steps, verify=args.verify)
    config = {"model": model_cfg.to_dict(), "train": train_cfg.to_dict()}
    print(diag.to_json() if args.json else diag.describe(config))
    return 0 if diag.ok else 1


def _doctor_saved(args: argparse.Namespace) -> int:
    """``plumb doctor RUN_DIR``: the diagnosis the doctor wrote into a saved run's record
    (its rules ran on the live model while it trained: trainability, the loss's graph
    and the input test need it), with the headline and each finding's fix; exit 1 when
    it needs attention. Flags that describe a new diagnosis run are refused."""
    import json

    from plumb.record import load_run
    from plumb.report.html import run_headline

    given = [a for a in args._argv[1:] if a.startswith("--") and a not in ("--json",)]
    if given:
        raise PlumbError(
            f"plumb doctor RUN_DIR reads the saved run: drop {', '.join(given)} (or drop "
            "RUN_DIR to diagnose a new run with them)"
        )
    if not (Path(args.run) / "probes" / "meta.json").is_file():
        raise PlumbError(
            f"{args.run} is not a run directory with a probe record (plumb train --out, or "
            "Monitor(out=...))"
        )
    rec = load_run(args.run)
    if rec.doctor is None and not rec.findings:
        raise PlumbError(
            f"the doctor did not run on {args.run} (trained with --no-doctor, or a Monitor "
            "without doctor=True): plumb doctor diagnoses a new run without RUN_DIR"
        )
    head = run_headline(rec)
    if args.json:
        print(json.dumps({"headline": head.plain(), "findings": rec.findings}, indent=2))
    else:
        print(_verdict_lines(rec))
    return 1 if head.kind == "bad" else 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from plumb.experiments import NAMES, Options, run_all, run_experiment, spec, sweeps
    from plumb.experiments.base import parse_values

    if args.name == "list":
        for n in NAMES:
            print(f"{n:<18} {spec(n).TITLE}")
        return 0
    sweep = {}
    for flag in sweeps():
        text = getattr(args, flag.replace("-", "_"))
        if text is not None:
            sweep[flag] = parse_values(flag, text)
    options = Options(
        quick=args.quick,
        steps=args.steps,
        seed=args.seed,
        device=args.device,
        jobs=args.jobs,
        sweep=sweep,
        data=args.data,
    )
    if args.name == "all":

        def done(name: str, entry: dict) -> None:
            print(f"{name:<18} {entry['seconds']:>7.1f} s  {entry['headline']}", flush=True)

        index = run_all(args.out, options, on_done=done)
        print(f"index: {index}")
        return 0
    spec(args.name)  # an unknown name lists the available ones
    page = run_experiment(args.name, args.out, options)
    import json

    summary = json.loads((page.parent / "results.json").read_text())
    print(f"{args.name}: {summary['headline']}")
    print(f"answer: {summary['answer']}")
    print(f"page: {page}  ({summary['settings']['seconds']} s)")
    return 0


def make_parser() -> argparse.ArgumentParser:
    from plumb._version import __version__

    parser = Parser(
        prog="plumb",
        description="makemore Part 3 as software: train, evaluate and sample "
        "a character-level MLP built from scratch.",
        epilog="run `plumb COMMAND --help` for each command's flags and examples",
    )
    parser.add_argument("--version", action="version", version=f"plumb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser(
        "train",
        help="train a model and save a run directory",
        epilog=EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_flags(p)
    _add_train_flags(p)
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N processes of this machine with DistributedDataParallel (gloo on "
        "the CPU, nccl on CUDA), as `torchrun --nproc-per-node N -m plumb train ...` does; "
        "each rank takes batch/N examples of every batch (1)",
    )
    p.set_defaults(func=cmd_train, _defaults={a.dest: a.default for a in p._actions})

    p = sub.add_parser(
        "eval",
        help="loss of a saved run on its splits",
        epilog="examples:\n  plumb eval runs/quick --split val,test\n  plumb eval --run runs/quick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run directory")
    p.add_argument("--run", help="run directory (the same as RUN_DIR)")
    p.add_argument(
        "--split", default="train,val,test", help="comma-separated splits (train,val,test)"
    )
    p.add_argument("--data", help="data file (default: the one the run was trained on)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "sample",
        help="sample items from a saved run",
        epilog="example:\n  plumb sample runs/quick -n 20 --temperature 0.8 --top-k 10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run directory")
    p.add_argument("--run", help="run directory (the same as RUN_DIR)")
    p.add_argument("-n", type=int, default=20, help="number of samples (20)")
    p.add_argument("--seed", type=int, default=2147483647 + 10, help="sampling seed (2147483657)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature, > 0 (1.0)")
    p.add_argument("--top-k", type=int, help="sample from the k likeliest characters (all)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "report",
        help="(re)build RUN_DIR/report.html and figures from a run's probe record",
        epilog="examples:\n  plumb report runs/demo\n  plumb report runs/mine --tensorboard",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="run directory (plumb train --out, or Monitor(out=...))")
    p.add_argument(
        "--tensorboard",
        nargs="?",
        const="",
        metavar="DIR",
        help="also export TensorBoard event files (default DIR: RUN_DIR/tensorboard)",
    )
    p.add_argument(
        "--watch",
        nargs="?",
        const=5.0,
        type=float,
        metavar="SECONDS",
        help="while the run trains, rebuild the report every SECONDS (5); the page reloads itself",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "compare",
        help="one page setting runs side by side: losses, config diff, layers, findings",
        epilog="example:\n  plumb compare runs/original runs/kaiming --out compare.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="two or more run directories")
    p.add_argument(
        "--out", help="the page to write (default: compare-A-vs-B.html beside the first run)"
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "doctor",
        help="diagnose a model's training: findings with evidence and a fix (exit 1 if not ok)",
        epilog="examples:\n  plumb doctor                               # lecture-deep\n"
        "  plumb doctor --preset lecture-mlp:original --json\n"
        "  plumb doctor --preset lecture-mlp:original --verify   # measure each fix\n"
        "  plumb doctor --norm none --gain 0.5 --n-layers 10\n"
        "  plumb doctor --catalogue                   # the fault catalogue's confusion table\n"
        "  plumb doctor runs/demo                     # a saved run's diagnosis and fixes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run",
        nargs="?",
        metavar="RUN_DIR",
        help="a saved run (plumb train, or Monitor(out=...)): print its diagnosis, each "
        "finding with its fix, instead of training a new one",
    )
    _add_model_flags(p)
    g = p.add_argument_group("the diagnosis run (defaults come from --preset)")
    g.add_argument("--steps", type=int, default=100, help="training steps to watch (100)")
    _add_step_flags(g)
    g.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    g.add_argument(
        "--verify",
        action="store_true",
        help="measure each finding's fix: train copies from the same start on the same "
        "batches with and without it, compare held-out loss (off)",
    )
    g.add_argument(
        "--catalogue",
        nargs="?",
        const="",
        metavar="NAMES",
        help="run the fault catalogue (all, or comma-separated set-ups) and print the "
        "confusion table",
    )
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "lecture",
        help="rerun the lecture's loss-log table and compare",
        epilog="examples:\n  plumb lecture                     # all five stages, 200k steps each\n"
        "  plumb lecture --steps 20000 --stages kaiming,batchnorm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, help="steps per stage (200000, as published)")
    p.add_argument(
        "--stages",
        default="all",
        help="comma-separated: original,fix-softmax,fix-tanh,kaiming,batchnorm (all five)",
    )
    p.add_argument("--threads", type=int, default=1, help="threads per stage (1: bit-exact)")
    p.add_argument("--jobs", type=int, help="stages run at once (default: cores)")
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_lecture)

    p = sub.add_parser(
        "experiment",
        help="rerun one of the lecture's experiments (or all) into a folder with figures, "
        "tables and a page",
        epilog="examples:\n  plumb experiment list\n  plumb experiment gain-sweep --gains 0.5,1,5/3,2,3\n"
        "  plumb experiment all --out runs/experiments          # ~14 min on 2 cores\n"
        "  plumb experiment all --quick                         # seconds each",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="an experiment's name, all, or list")
    p.add_argument("--out", default="runs/experiments", help="root folder (runs/experiments)")
    p.add_argument("--quick", action="store_true", help="shrink every experiment to seconds")
    p.add_argument("--steps", type=int, help="training steps (default: each experiment's)")
    p.add_argument("--seed", type=int, default=2147483647, help="generator seed (2147483647)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--jobs", type=int, help="configurations trained at once (default: cores)")
    p.add_argument("--data", help=argparse.SUPPRESS)
    g = p.add_argument_group("sweep values (comma-separated; fractions like 5/3 allowed)")
    from plumb.experiments import sweep_help, sweeps

    for flag in sweeps():  # one flag per experiments' Sweep
        g.add_argument(f"--{flag}", help=sweep_help(flag))
    p.set_defaults(func=cmd_experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    args._argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return args.func(args)
    except PlumbError as e:
        if os.environ.get("PLUMB_LAUNCHED") and os.environ.get("RANK", "0") != "0":
            return 2  # every rank found the same bad input: rank 0 says it
        print(f"plumb: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("plumb: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `plumb ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
