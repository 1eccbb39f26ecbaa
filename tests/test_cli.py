import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plumb.cli import main
from plumb.runs import Run

TINY = ["--n-hidden", "16", "--n-layers", "2", "--steps", "300", "--no-progress", "--samples", "5"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", *TINY, "--out", str(out), "--print-every", "100"]) == 0
    return out


def test_train_writes_a_complete_run(run_dir, capsys):
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "metrics.json",
        "losses.safetensors",
    }
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["format"] == 1 and cfg["model"]["n_hidden"] == 16 and len(cfg["data"]["vocab"]) == 26
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["loss"]) == {"train", "val", "test"}
    run = Run(run_dir)
    assert run.losses()["loss"].shape == (300,)
    assert not any(p.suffix in (".pt", ".pkl", ".pth") for p in run_dir.iterdir())


def test_eval_reloads_the_same_numbers(run_dir, capsys):
    assert main(["eval", "--run", str(run_dir)]) == 0
    out = dict(line.split() for line in capsys.readouterr().out.strip().splitlines())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for split, value in out.items():
        assert float(value) == pytest.approx(metrics["loss"][split], abs=1e-4)


def test_eval_and_sample_take_the_run_positionally(run_dir, capsys):
    """As report and compare do: `plumb eval RUN_DIR` is `plumb eval --run RUN_DIR`."""
    for cmd, extra in (("eval", []), ("sample", ["-n", "5"])):
        assert main([cmd, str(run_dir), *extra]) == 0
        positional = capsys.readouterr().out
        assert main([cmd, "--run", str(run_dir), *extra]) == 0
        assert capsys.readouterr().out == positional and positional.strip()


def test_sample_is_reproducible_and_marks_training_items(run_dir, capsys):
    args = ["sample", "--run", str(run_dir), "-n", "30", "--seed", "5"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert main(args) == 0
    second = capsys.readouterr()
    assert first.out == second.out and len(first.out.strip().splitlines()) == 30
    # every marking is the truth: a word is marked "(in S set)" iff it is an item of split S
    from plumb.pipeline import training_items

    items = training_items(Run(run_dir))
    marks = {"train": 0, "val": 0, "test": 0, "new": 0}
    assert main(["sample", "--run", str(run_dir), "-n", "400", "--seed", "5"]) == 0
    many = capsys.readouterr()
    for line in many.out.splitlines():
        word, _, mark = line.partition("   (in ")
        where = [s for s, names in items.items() if word in names]
        assert (mark.removesuffix(" set)") or None) == (where[0] if where else None), line
        marks[where[0] if where else "new"] += 1
    assert marks["train"] >= 1  # the run learnt names: some samples are real training items
    assert f"({marks['new']} new, {marks['train']} in train, {marks['val']} in val" in many.err
    # top-k 1 with a low temperature is greedy: every sample the same
    assert main(["sample", "--run", str(run_dir), "-n", "5", "--top-k", "1"]) == 0
    assert (
        len(
            {
                line.split()[0] if line.split() else ""
                for line in capsys.readouterr().out.splitlines()
            }
        )
        == 1
    )


def test_lecture_command_short(capsys, tmp_path):
    """The table prints the losses it measured: the kaiming row equals a `plumb train` of
    the same preset and steps (another code path), and each diff is measured - published."""
    from plumb import reference

    assert main(["lecture", "--steps", "50", "--stages", "original,kaiming", "--jobs", "1"]) == 0
    cap = capsys.readouterr()
    # progress inside each stage, on stderr, at the notebook's printed steps
    assert re.search(r"^  kaiming: step 0 of 50, loss 3\.\d{4} \(\d+ s\)$", cap.err, re.M)
    rows = {
        line.split()[0]: [float(x) for x in line.split()[1:]]
        for line in cap.out.splitlines()
        if line.split() and line.split()[0] in ("original", "kaiming")
    }
    assert set(rows) == {"original", "kaiming"}
    for stage, (pub_tr, pub_va, tr, va, d_tr, d_va) in rows.items():
        assert (pub_tr, pub_va) == tuple(round(x, 4) for x in reference.LOSS_LOG[stage])
        # each printed to 4 decimals: the printed diff is within 1.5e-4 of the printed values'
        assert d_tr == pytest.approx(tr - pub_tr, abs=2e-4)
        assert d_va == pytest.approx(va - pub_va, abs=2e-4)
    out = tmp_path / "k"
    # the loss log's lr schedule (the lecture's decay step, not one scaled to --steps)
    argv = ["--steps", "50", "--lr-decay-step", "100000", "--engine", "eager", "--threads", "1", "--no-probes"]  # fmt: skip
    assert main(["train", "--preset", "lecture-mlp:kaiming", *argv, "--samples", "0", "--out", str(out)]) == 0  # fmt: skip
    loss = json.loads((out / "metrics.json").read_text())["loss"]
    assert rows["kaiming"][2:4] == [round(loss["train"], 4), round(loss["val"], 4)]
    # the lecture's point, measured: the original init's confident wrong start costs loss
    assert rows["original"][3] > rows["kaiming"][3] + 1


BAD = [
    (["train", "--data", "/nonexistent/names.txt"], "does not exist"),
    (["train", "--block-size", "0"], "--block-size must be a positive integer"),
    (["train", "--steps", "-1"], "--steps must be an integer >= 1"),
    (["train", "--steps", "0"], "--steps must be an integer >= 1"),
    (["train", "--lr", "0"], "--lr must be a finite number > 0"),
    (["train", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["eval"], "give the run directory: plumb eval RUN_DIR"),
    (["sample", "a", "--run", "b"], "two run directories (a and b): give one"),
    (["train", "--preset", "nope"], "unknown preset"),
    (["train", "--norm", "group"], "invalid choice"),
    (["train", "--steps", "ten"], "invalid int value"),
    (["train", "--device", "tpu"], "device"),
    (["sample", "--run", "/nonexistent/run"], "does not exist"),
    (["sample", "--run", "."], "config.json is missing"),  # the temperature check: below
    (["lecture", "--stages", "bogus"], "unknown stage"),
]


@pytest.mark.parametrize(("argv", "message"), BAD)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, argv, message):
    out = tmp_path / "run"
    argv = [*argv, "--out", str(out)] if argv[0] == "train" else argv
    proc = subprocess.run(
        [sys.executable, "-m", "plumb.cli", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plumb: error:"), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"\n\n", b"ok\n\xff\n", b"one\n"])
def test_bad_data_files_write_nothing(tmp_path, content):
    data = tmp_path / "d.txt"
    data.write_bytes(content)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--steps", "5"]) == 2
    assert not out.exists()


def test_damaged_run_is_a_clear_error(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "metrics.json"):
        (broken / name).write_bytes((run_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes()[:100])
    assert main(["sample", "--run", str(broken)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    (broken / "config.json").write_text("{not json")
    assert main(["eval", "--run", str(broken)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_train_writes_probes_report_and_layer_table(run_dir, capsys, tmp_path):
    assert (run_dir / "report.html").is_file() and (run_dir / "probes" / "meta.json").is_file()
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "layer statistics at step 250" in out and "tanh2" in out and "report:" in out
    assert main(["report", str(run_dir), "--tensorboard", str(tmp_path / "tb")]) == 0
    assert any((tmp_path / "tb").iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--probe-every", "0"], "--probe-every must be an integer >= 1"),
        (["train", "--probe-every", "10", "--hist-every", "15"], "must be a multiple"),
        (["train", "--no-probes", "--tensorboard"], "--tensorboard needs the probes"),
        (["report", "/nonexistent/run"], "does not exist"),
    ],
)
def test_probe_flags_bad_input(args, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "plumb.cli", *args, "--out", str(tmp_path / "o")]
        if args[0] == "train"
        else [sys.executable, "-m", "plumb.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_report_on_damaged_record(run_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    (bad / "probes" / "histograms.safetensors").write_bytes(b"\x00garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "plumb.cli", "report", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "not a readable safetensors file" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- a command line without surprises (issue 16) -------------------------------------------
def _code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's usage errors
        return e.code


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--step", "10"], "unrecognized arguments: --step 10: did you mean --steps?"),
        (["train", "--stpes", "10"], "did you mean --steps?"),
        (["trian"], "invalid choice: 'trian'"),
        (["train", "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["train", "--lr-final", "-1"], "--lr-final must be a finite number > 0"),
        (["train", "--average-from", "-1"], "--average-from must be an integer >= 0, got -1"),
        (["train", "--average-every", "0"], "--average-every must be an integer >= 1, got 0"),
        (["train", "--norm", "none", "--out-norm"], "(--norm), or no output norm (--no-out-norm)"),
    ],
)
def test_usage_errors_name_flags_and_suggest(argv, expected, capsys, tmp_path):
    assert _code([*argv, "--out", str(tmp_path / "r")] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert "batch_size" not in err[0] and "lr_final" not in err[0]
    if argv == ["trian"]:
        assert "did you mean train?" in err[0]
    assert not (tmp_path / "r").exists()


def test_norm_none_needs_no_more_flags_and_the_banner_names_the_changes(tmp_path, capsys):
    out = tmp_path / "plain"
    argv = ["train", "--norm", "none", "--n-layers", "2", "--steps", "30", "--out", str(out)]
    assert main([*argv, "--samples", "0", "--no-progress"]) == 0
    banner = capsys.readouterr().out.splitlines()[0]
    assert banner.startswith(
        "plumb: training lecture-deep with --n-layers 2 --norm none --no-out-norm for 30 steps"
    )
    cfg = json.loads((out / "config.json").read_text())["model"]
    assert cfg["norm"] == "none" and cfg["out_norm"] is False and cfg["n_layers"] == 2


def test_a_finished_run_is_refused_silently_and_resume_says_complete(run_dir, capsys):
    before = (run_dir / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["train", "--steps", "30", "--out", str(run_dir)]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and len(cap.err.strip().splitlines()) == 1 and "--resume" in cap.err
    assert main(["train", "--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "is complete" in out[0] and "nothing to resume" in out[0]
    assert (run_dir / "metrics.json").stat().st_mtime_ns == before  # nothing retrained


def test_resume_finishes_a_run_killed_after_its_last_checkpoint(run_dir, tmp_path, capsys):
    """A kill between the final checkpoint (status complete) and the run's last output
    (metrics.json) leaves outputs missing: --resume writes them, it does not say "complete"."""
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "killed"
    shutil.copytree(run_dir, out)
    for name in ("metrics.json", "losses.safetensors", "samples.json"):
        (out / name).unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "is complete" not in capsys.readouterr().out
    want, got = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, out))
    assert got["steps"] == want["steps"] and got["loss"] == want["loss"]
    a, b = (load_file(d / "losses.safetensors") for d in (run_dir, out))
    assert torch.equal(a["loss"], b["loss"]) and (out / "samples.json").is_file()


def _examples() -> list[tuple[str, list[str]]]:
    """Every example of every command's --help, as (command, argv without 'plumb')."""
    import argparse
    import shlex

    from plumb.cli import make_parser

    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, p in sub.choices.items():
        for line in (p.epilog or "").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("plumb "):
                out.append((name, shlex.split(line)[1:]))
    return out


def _small(argv: list[str]) -> list[str]:
    """The example with a small run: steps and flags that keep it to seconds."""
    argv = list(argv)

    def setflag(flag: str, value: str) -> None:
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv.extend([flag, value])

    cmd = argv[0]
    if cmd == "train":
        setflag("--steps", "30")
        if "--lr-decay-step" in argv:
            setflag("--lr-decay-step", "20")
        argv += ["--no-progress", "--samples", "2", "--threads", "1"]
    elif cmd == "doctor":
        if "--catalogue" in argv:
            argv[argv.index("--catalogue") :] = ["--catalogue", "lecture-deep"]
        elif len(argv) < 2 or argv[1].startswith("--"):  # not `plumb doctor RUN_DIR`
            setflag("--steps", "20")
    elif cmd == "lecture":
        setflag("--steps", "30")
        if "--stages" not in argv:
            argv += ["--stages", "original"]
    elif cmd == "experiment" and argv[1] != "list":
        argv += ["--quick", "--steps", "3"]
        if argv[1] == "all":
            argv[1] = "calibration"  # one experiment stands for `all`
    return argv


@pytest.mark.slow
def test_every_help_example_runs(tmp_path, monkeypatch, capsys):
    """Each example in `plumb COMMAND --help`, run as written but small (--steps), in an
    empty directory with the runs the examples read; exit 0 (doctor: 0 or 1, its verdict)."""
    from plumb.catalogue import SETUPS

    monkeypatch.chdir(tmp_path)
    names = (Path(__file__).resolve().parents[1] / "src/plumb/datasets/names.txt").read_text()
    Path("words.txt").write_text("\n".join(names.split()[:2000]) + "\n")
    examples = _examples()
    assert {c for c, _ in examples} >= {"train", "eval", "sample", "report", "doctor"}
    assert any(s.name == "lecture-deep" for s in SETUPS)
    small = ["--n-hidden", "16", "--n-layers", "2", "--steps", "30", "--no-progress"]
    for run in ("quick", "demo", "mine", "original", "kaiming"):  # the runs examples read
        assert main(["train", *small, "--samples", "0", "--out", f"runs/{run}"]) == 0
    ran = 0
    order = sorted(examples, key=lambda e: e[0] != "train")
    for cmd, argv in order:
        if cmd == "train" and "--out" in argv and Path(argv[argv.index("--out") + 1]).exists():
            continue  # runs/quick exists already: the eval/sample examples read it
        code = main(_small(argv))
        assert code in ((0, 1) if cmd == "doctor" else (0,)), (argv, capsys.readouterr().err)
        ran += 1
    assert ran >= 14


def test_every_flag_says_its_default():
    """`plumb COMMAND --help`: every flag has a help text, and every flag that takes a
    value shows its default (a value in parentheses, or 'default')."""
    import argparse

    from plumb.cli import make_parser

    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        for a in p._actions:
            if not a.option_strings or isinstance(a, argparse._HelpAction):
                continue
            if a.help == argparse.SUPPRESS or a.required:
                continue
            flag = f"{name} {a.option_strings[-1]}"
            if not a.help or (
                a.nargs != 0
                and not isinstance(a, argparse.BooleanOptionalAction)
                and "(" not in a.help
                and "default" not in a.help
            ):
                missing.append(flag)
    assert missing == []


# --- flags that had no test -------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--temperature", "0"], "--temperature must be a finite number > 0"),
        (["--temperature", "nan"], "--temperature must be a finite number > 0"),
        (["--top-k", "0"], "--top-k must be >= 1"),
        (["-n", "0"], "-n must be >= 1"),
    ],
)
def test_sample_bad_values_reach_their_check(run_dir, flag, message, capsys):
    """On a real run (so no earlier check answers first), each bad value is refused."""
    assert main(["sample", "--run", str(run_dir), *flag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_eval_split_prints_the_runs_own_losses(run_dir, capsys):
    loss = json.loads((run_dir / "metrics.json").read_text())["loss"]
    capsys.readouterr()
    assert main(["eval", "--run", str(run_dir), "--split", "test,val"]) == 0
    lines = capsys.readouterr().out.split()
    assert lines == ["test", f"{loss['test']:.4f}", "val", f"{loss['val']:.4f}"]
    assert main(["eval", "--run", str(run_dir), "--split", "dev"]) == 2


def _hidden_preacts(model, X):
    """The input of the first BatchNorm for every example of X (training-set statistics)."""
    with torch.no_grad():
        h = model.layers.linear1(model.layers.flatten(model.layers.embedding(X)))
    return h


def test_calibrate_bn_sets_running_stats_to_the_training_set(tmp_path):
    """--calibrate-bn: norm1's running mean and variance are the whole training set's
    (a run without it keeps the momentum-averaged buffers, which differ)."""
    from plumb.data import load_dataset

    argv = ["train", "--n-hidden", "16", "--n-layers", "2", "--steps", "50", "--no-probes", "--samples", "0", "--no-progress"]  # fmt: skip
    assert main([*argv, "--calibrate-bn", "--out", str(tmp_path / "c")]) == 0
    assert main([*argv, "--out", str(tmp_path / "p")]) == 0
    run = Run(tmp_path / "c")
    assert run.metrics()["bn_calibrated"] is True
    data = load_dataset(None, block_size=run.data_info["block_size"])
    model = run.load_model()
    h = _hidden_preacts(model, data.train.X)
    bn = model.layers.norm1
    torch.testing.assert_close(bn.running_mean, h.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, h.var(0), rtol=1e-3, atol=1e-5)
    plain = Run(tmp_path / "p").load_model().layers.norm1
    assert not torch.allclose(plain.running_mean, h.mean(0), rtol=1e-3, atol=1e-4)
    assert Run(tmp_path / "p").metrics()["bn_calibrated"] is False


def test_bn_variance_lecture_normalises_with_the_unbiased_variance(tmp_path):
    """--bn-variance lecture: every BatchNorm divides by the unbiased batch std, so a
    training-mode batch of n comes out with (biased) std sqrt((n - 1) / n), not 1."""
    argv = ["train", "--n-hidden", "16", "--n-layers", "2", "--steps", "1", "--no-probes", "--samples", "0", "--no-progress"]  # fmt: skip
    stds = {}
    for variance in ("lecture", "torch"):
        out = tmp_path / variance
        assert main([*argv, "--bn-variance", variance, "--out", str(out)]) == 0
        model = Run(out).load_model().train()
        assert model.layers.norm1.variance == variance
        bn = model.layers.norm1
        x = torch.randn(32, bn.weight.shape[0], generator=torch.Generator().manual_seed(0)) * 3 + 1
        with torch.no_grad():
            y = (bn(x) - bn.bias) / bn.weight
        stds[variance] = y.std(0, correction=0).mean().item()
    assert stds["torch"] == pytest.approx(1.0, abs=1e-3)
    assert stds["lecture"] == pytest.approx(math.sqrt(31 / 32), abs=1e-3)


@pytest.mark.slow
def test_compile_trains_the_same_curve(tmp_path):
    """--compile (torch.compile of the model, eager engine) follows the uncompiled run's
    loss curve to float32 round-off, and the run records the flag."""
    from safetensors.torch import load_file

    argv = ["train", "--n-hidden", "16", "--n-layers", "2", "--steps", "60", "--engine", "eager", "--no-probes", "--samples", "0", "--no-progress"]  # fmt: skip
    assert main([*argv, "--compile", "--out", str(tmp_path / "c")]) == 0
    assert main([*argv, "--out", str(tmp_path / "e")]) == 0
    a, b = (load_file(tmp_path / d / "losses.safetensors")["loss"] for d in ("c", "e"))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert Run(tmp_path / "c").train_config.compile is True
