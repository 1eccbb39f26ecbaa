"""plumb in PyTorch Lightning: ``Trainer(callbacks=[plumb.lightning.Doctor()])``.

The callback attaches a :class:`plumb.Monitor` (probes and the doctor) to the
``LightningModule`` when fitting starts, with the trainer's optimizers and, under
``16-mixed``, its GradScaler. Each optimizer step is one Monitor step: Lightning's
automatic optimization runs ``training_step``, ``zero_grad`` (first micro-batch of an
accumulation window), backward and ``optimizer.step``, and leaves the gradients in place
until the next window, so the step is taken at ``on_train_batch_end`` once
``trainer.global_step`` has advanced, with the loss ``training_step`` returned (its graph,
seen at ``on_before_backward``; divided by ``accumulate_grad_batches``, as Lightning
back-propagates it). Validation runs without gradients and stays out of the record.
Under ``DDPStrategy`` every rank probes (a record step is the global step) and rank 0
writes.

Per-layer scalars go through the trainer's loggers (``log_metrics``: TensorBoard, CSV,
W&B, MLflow, ...) as ``plumb/act_std/<layer>`` etc. (``plumb.trackers``); each new
finding is printed on rank 0 as it is found; at the end of fitting the report and
``findings.json`` land in ``<log_dir>/plumb`` (``out=`` to choose), the verdict is printed
with each finding's fix, and the hooks are removed, also when fitting fails or is
interrupted.

Needs ``pip install 'plumb[lightning]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plumb.trackers import MetricsSink, need, say_finding, say_verdict

pl = need("lightning.pytorch", "lightning")


class Doctor(pl.Callback):
    """Probes and the doctor on a Lightning fit. ``every``: a record step every that many
    optimizer steps (50); ``out``: the run directory (default ``<log_dir>/plumb``);
    ``check_every``: optimizer steps between the doctor's checks (default: the
    Monitor's); ``log``: per-layer scalars through the trainer's loggers (True);
    ``sinks``: more Monitor sinks (``plumb.trackers.WandbSink``, ...); ``probes``: further
    :class:`plumb.Monitor` arguments. After fitting, ``diagnosis`` is the doctor's."""

    def __init__(
        self,
        every: int = 50,
        *,
        out: str | Path | None = None,
        check_every: int | None = None,
        log: bool = True,
        report: bool = True,
        sinks: tuple[Any, ...] = (),
        **probes: Any,
    ):
        super().__init__()
        self.every, self.out, self.check_every = every, out, check_every
        self.log, self.report, self.extra_sinks, self.probes = log, report, sinks, probes
        self.monitor: Any = None
        self.diagnosis: Any = None
        self._loss: Any = None
        self._stepped = 0

    # --- lifecycle --------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        from plumb.monitor import Monitor

        out = Path(self.out) if self.out is not None else self.run_dir(trainer)
        sinks = list(self.extra_sinks)
        if self.log and trainer.is_global_zero:
            sinks += [MetricsSink(lg) for lg in trainer.loggers]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        rank0 = trainer.is_global_zero
        self.monitor = Monitor(
            pl_module,
            self.every,
            optimizer=list(trainer.optimizers),
            doctor=True,
            check_every=self.check_every,
            on_finding=say_finding if rank0 else None,
            out=out,
            report=self.report,
            sinks=sinks,
            scaler=scaler,
            **self.probes,
        )
        self.monitor.__enter__()
        self._stepped = trainer.global_step

    @staticmethod
    def run_dir(trainer: Any) -> Path:
        """``<log_dir>/plumb``: beside the logger's own files (``default_root_dir``
        without a logger)."""
        root = trainer.log_dir or trainer.default_root_dir
        return Path(root) / "plumb"

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        self._loss = loss

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is None or trainer.global_step == self._stepped or self._loss is None:
            return  # mid-window of gradient accumulation: the optimizer has not stepped
        self._stepped = trainer.global_step
        self.monitor.step(self._loss)
        self._loss = None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close(trainer, ok=True)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close(trainer, ok=isinstance(exception, KeyboardInterrupt))

    def _close(self, trainer: Any, ok: bool) -> None:
        mon, self.monitor = self.monitor, None
        if mon is None:
            return
        mon.close(write_report=ok, check=ok)
        self.diagnosis = mon.diagnosis
        if trainer.is_global_zero and self.diagnosis is not None:
            say_verdict(mon, wrote_report=ok)


__all__ = ["Doctor"]
