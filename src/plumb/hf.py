"""plumb in the Hugging Face Trainer: ``Trainer(..., callbacks=[plumb.hf.Doctor()])``.

The callback attaches a :class:`plumb.Monitor` (probes and the doctor) to the model when
training begins, with the Trainer's optimizer. The Trainer clears gradients right after
``optimizer.step()``, so each optimizer step is taken at ``on_optimizer_step`` (after the
update, before ``zero_grad``), with the loss of the step's last forward (a model that
returns a ``ModelOutput`` with ``.loss``; read by a forward hook, with its graph). Under
gradient accumulation the record pools the step's micro-batches; evaluation runs without
gradients and stays out of the record.

The per-layer scalars reach the integrations of ``args.report_to`` on the main process:
``wandb`` (the run the Trainer's W&B callback started), ``mlflow`` (its active run),
``tensorboard`` (``args.logging_dir``), named ``plumb/act_std/<layer>`` etc.
(``plumb.trackers``). When training ends, ``report.html``, ``findings.json`` and the record
land in ``args.output_dir`` (``out=`` to choose) and the verdict is printed with each
finding's fix.

Needs ``pip install 'plumb[hf]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plumb.trackers import MLflowSink, WandbSink, need, say_finding, say_verdict

transformers = need("transformers", "hf")


class Doctor(transformers.TrainerCallback):
    """Probes and the doctor on a ``transformers.Trainer`` run. ``every``: a record step
    every that many optimizer steps (50); ``out``: the run directory (default
    ``args.output_dir``); ``check_every``: optimizer steps between the doctor's checks;
    ``trackers``: send the scalars to ``args.report_to``'s W&B, MLflow and TensorBoard
    (True); ``probes``: further :class:`plumb.Monitor` arguments. After training,
    ``diagnosis`` is the doctor's."""

    def __init__(
        self,
        every: int = 50,
        *,
        out: str | Path | None = None,
        check_every: int | None = None,
        trackers: bool = True,
        report: bool = True,
        **probes: Any,
    ):
        self.every, self.out, self.check_every = every, out, check_every
        self.trackers, self.report, self.probes = trackers, report, probes
        self.monitor: Any = None
        self.diagnosis: Any = None
        self._loss: Any = None
        self._main = True

    def _sinks(self, args: Any) -> list[Any]:
        report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
        sinks: list[Any] = []
        if not self.trackers:
            return sinks
        if "wandb" in report_to:
            wandb = need("wandb", "wandb")
            if wandb.run is not None:
                sinks.append(WandbSink(wandb.run))
        if "mlflow" in report_to:
            mlflow = need("mlflow", "mlflow")
            if mlflow.active_run() is not None:
                sinks.append(MLflowSink())
        if "tensorboard" in report_to and args.logging_dir:
            from plumb.report.tensorboard import TensorBoardSink

            sinks.append(TensorBoardSink(Path(args.logging_dir) / "plumb"))
        return sinks

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw: Any) -> None:  # fmt: skip
        from plumb.monitor import Monitor

        self._main = main = state.is_world_process_zero

        def keep_loss(output: Any) -> None:
            loss = getattr(output, "loss", None)
            if loss is None and isinstance(output, dict):
                loss = output.get("loss")
            if loss is not None and getattr(loss, "requires_grad", False):
                self._loss = loss

        self.monitor = Monitor(
            model,
            self.every,
            optimizer=optimizer,
            doctor=True,
            check_every=self.check_every,
            on_finding=say_finding if main else None,
            out=Path(self.out or args.output_dir),
            report=self.report,
            sinks=self._sinks(args) if main else [],
            **self.probes,
        )
        self.monitor.__enter__()
        self.monitor.on_output(keep_loss)  # the loss the model returns, with its graph

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.monitor is None or self._loss is None:
            return
        self.monitor.step(self._loss)
        self._loss = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        mon, self.monitor = self.monitor, None
        if mon is None:
            return
        mon.close()
        self.diagnosis = mon.diagnosis
        if self._main and self.diagnosis is not None:
            say_verdict(mon)


__all__ = ["Doctor"]
