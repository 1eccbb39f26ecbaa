"""The trackers practitioners already watch, as Monitor sinks: Weights & Biases, MLflow,
and any logger with ``log_metrics(metrics, step)`` (every Lightning logger).

A sink gets each flush's record rows (``write``), the validation loss (``val``), the
diagnosis when the block ends (``findings``: the headline and each finding with its fix)
and the run directory's files (``artifacts``: the report and findings.json), then
``close``. Names follow one scheme, with the tool's separator: ``plumb/loss``,
``plumb/act_std/<layer>`` (``act_mean``, ``act_saturated``, ``act_zero``, ``act_dead``),
``plumb/grad_std/<layer>`` (the gradient flowing into the layer's output), and per
weight ``plumb/grad_data/<param>``, ``plumb/update_data/<param>`` (log10),
``plumb/w_rms/<param>``; histograms as ``plumb/hist/<section>/<name>``.

The packages are optional (``pip install 'plumb[wandb]'``, ``'plumb[mlflow]'``):
importing plumb never imports them, and a sink whose package is missing says which extra
to install.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from plumb.errors import PlumbError

#: a layer statistic -> its metric family (None: not exported)
LAYER_NAMES = {
    "mean": "act_mean",
    "std": "act_std",
    "saturated": "act_saturated",
    "zero": "act_zero",
    "dead": "act_dead",
    "grad_std": "grad_std",
}
PARAM_NAMES = {"grad_data": "grad_data", "update_data": "update_data", "rms": "w_rms"}


def need(module: str, extra: str) -> Any:
    """``import module``, or a one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PlumbError(
            f"this needs the {module.split('.')[0]} package: pip install 'plumb[{extra}]'"
        ) from None


def scalars(rows: list[dict[str, Any]], sep: str = "/") -> list[tuple[int, dict[str, float]]]:
    """(step, {name: value}) per record row, finite values only, named as above."""
    out = []
    for row in rows:
        metrics: dict[str, float] = {}
        if row.get("loss") is not None and np.isfinite(row["loss"]):
            metrics[f"plumb{sep}loss"] = float(row["loss"])
        for section, names in (("layer", LAYER_NAMES), ("param", PARAM_NAMES)):
            for name, stats in row.get(section, {}).items():
                for stat, v in stats.items():
                    family = names.get(stat)
                    if family and v is not None and np.isfinite(v):
                        metrics[f"plumb{sep}{family}{sep}{name}"] = float(v)
        out.append((int(row["step"]), metrics))
    return out


def finding_rows(findings: list[dict[str, Any]], config: dict | None = None) -> list[list[str]]:
    """[severity, code, where, message, fix] per finding."""
    from plumb.doctor.fixes import exact_fix

    return [
        [
            str(f.get("severity")),
            str(f.get("code")),
            str(f.get("where")),
            str(f.get("message")),
            exact_fix(f, config) or "",
        ]
        for f in findings
    ]


def say_finding(finding: Any, step: int) -> None:
    """A framework callback's ``on_finding``: the new finding, on the main process."""
    print(
        f"plumb doctor at step {step}: [{finding.severity}] {finding.code} @ "
        f"{finding.where}: {finding.message}",
        flush=True,
    )


def say_verdict(mon: Any, wrote_report: bool = True) -> None:
    """A framework callback's last lines: the headline, each finding with its fix, and
    where the report is."""
    from plumb.doctor.fixes import verdict_lines

    found = [f.to_dict() for f in mon.diagnosis.findings]
    print("\n".join(verdict_lines(found, mon.step_count, prefix="plumb doctor")), flush=True)
    if mon.out is not None and mon.report and wrote_report:
        print(f"plumb report: {Path(mon.out) / 'report.html'}", flush=True)


class MetricsSink:
    """Record rows through ``log_metrics(metrics: dict, step: int)``: a Lightning logger
    (TensorBoard, CSV, W&B, MLflow, ...), or any function of that shape. ``step_of``
    maps a record step (the Monitor's count of optimizer steps) to the caller's step."""

    def __init__(self, log_metrics: Any, step_of: Any = None):
        self.log_metrics = getattr(log_metrics, "log_metrics", log_metrics)
        self.step_of = step_of or (lambda s: s)

    def write(self, history: Any, rows: list[dict[str, Any]], new_hists: dict) -> None:
        for step, metrics in scalars(rows):
            if metrics:
                self.log_metrics(metrics, step=self.step_of(step))
        self.last = int(history.loss.shape[0]) - 1 if history is not None else 0

    def findings(self, headline: Any, findings: list[dict[str, Any]], config: dict | None) -> None:
        """The verdict as numbers a metrics logger keeps: ``plumb/errors``,
        ``plumb/warnings``, ``plumb/infos`` at the last step."""
        counts = {
            f"plumb/{sev}s": float(sum(f.get("severity") == sev for f in findings))
            for sev in ("error", "warning", "info")
        }
        self.log_metrics(counts, step=self.step_of(max(getattr(self, "last", 0), 0)))

    def close(self) -> None:
        pass


class WandbSink:
    """Weights & Biases: scalars with ``run.log`` (step: the record step), histograms as
    ``wandb.Histogram``, the findings as a table (``plumb/findings``) and the verdict in the
    run summary (``plumb/verdict``, ``plumb/problems``), the report as a file. ``run``:
    the W&B run (default: the active ``wandb.run``; one is started if none is)."""

    def __init__(self, run: Any = None, **init: Any):
        self.wandb = need("wandb", "wandb")
        self.run = run or self.wandb.run or self.wandb.init(**init)

    def write(self, history: Any, rows: list[dict[str, Any]], new_hists: dict) -> None:
        by_step: dict[int, dict[str, Any]] = {}
        for step, metrics in scalars(rows):
            by_step.setdefault(step, {}).update(metrics)
        for key, entries in new_hists.items():
            for step, counts, rng in entries:
                lo, hi = float(rng[0]), float(rng[1])
                if not (np.isfinite(lo) and np.isfinite(hi)) or counts.sum() == 0:
                    continue
                edges = np.linspace(lo, hi if hi > lo else lo + 1e-12, len(counts) + 1)
                hist = self.wandb.Histogram(np_histogram=(np.asarray(counts, np.float64), edges))
                by_step.setdefault(int(step), {})[f"plumb/hist/{key}"] = hist
        for step in sorted(by_step):
            self.run.log(by_step[step], step=step, commit=True)

    def val(self, step: int, loss: float) -> None:
        self.run.log({"plumb/val_loss": float(loss)}, step=int(step))

    def findings(self, headline: Any, findings: list[dict[str, Any]], config: dict | None) -> None:
        table = self.wandb.Table(
            columns=["severity", "code", "where", "message", "fix"],
            data=finding_rows(findings, config),
        )
        self.run.log({"plumb/findings": table})
        self.run.summary["plumb/verdict"] = headline.plain()
        self.run.summary["plumb/problems"] = sum(
            f.get("severity") in ("error", "warning") for f in findings
        )

    def artifacts(self, out: Path) -> None:
        for name in ("report.html", "findings.json"):
            if (out / name).is_file():
                self.run.save(str(out / name), base_path=str(out), policy="now")

    def close(self) -> None:
        pass


class MLflowSink:
    """MLflow: metrics per layer (``plumb.act_std.<layer>``: MLflow names take no "/"),
    the verdict as tags (``plumb.verdict``, ``plumb.problems``), ``findings.json`` and
    ``report.html`` as artifacts under ``plumb/``. ``run_id``: the run to log to
    (default: the active run; one is started if none is, and ended by ``close``)."""

    def __init__(self, run_id: str | None = None):
        self.mlflow = need("mlflow", "mlflow")
        self.client = self.mlflow.MlflowClient()
        active = self.mlflow.active_run()
        self.started = False
        if run_id is None and active is None:
            active = self.mlflow.start_run()
            self.started = True
        self.run_id = run_id or active.info.run_id

    def write(self, history: Any, rows: list[dict[str, Any]], new_hists: dict) -> None:
        entity = self.mlflow.entities
        for step, metrics in scalars(rows, sep="."):
            batch = [entity.Metric(k, v, 0, step) for k, v in metrics.items()]
            for i in range(0, len(batch), 1000):  # MLflow's batch limit
                self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def val(self, step: int, loss: float) -> None:
        self.client.log_metric(self.run_id, "plumb.val_loss", float(loss), step=int(step))

    def findings(self, headline: Any, findings: list[dict[str, Any]], config: dict | None) -> None:
        self.client.set_tag(self.run_id, "plumb.verdict", headline.plain())
        problems = sum(f.get("severity") in ("error", "warning") for f in findings)
        self.client.set_tag(self.run_id, "plumb.problems", str(problems))
        self.client.log_dict(self.run_id, {"findings": findings}, "plumb/findings.json")

    def artifacts(self, out: Path) -> None:
        if (out / "report.html").is_file():
            self.client.log_artifact(self.run_id, str(out / "report.html"), "plumb")

    def close(self) -> None:
        if self.started:
            self.mlflow.end_run()
            self.started = False
