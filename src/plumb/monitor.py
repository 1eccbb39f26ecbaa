"""``plumb.Monitor``: the probes, the doctor and the report around a user's own loop.

    with plumb.Monitor(model, optimizer=opt, doctor=True, out="runs/mine") as mon:
        for xb, yb in batches:
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(); loss.backward(); opt.step()
            mon.step(loss)
            if mon.diagnosis and not mon.diagnosis.ok: ...   # refreshed at each check
    print(mon.diagnosis)          # the doctor's findings, also in out/report.html

The layers stay separate: ``plumb.probes.Probes`` measures (the only hooks), the doctor
(``plumb.doctor.Doctor``) judges what was measured, and the views (``plumb.report``)
draw it; this class wires the three together for the common case.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from plumb import report as views
from plumb.doctor import Diagnosis, Doctor, Finding
from plumb.io import write_json
from plumb.probes import Probes
from plumb.style import styled


class Monitor(Probes):
    """Record activation, gradient and update statistics of ``model`` while it trains
    (every argument of :class:`plumb.probes.Probes`), and optionally diagnose them.

    ``doctor=True`` runs the doctor's rules in the loop: after the first step, every
    ``check_every`` steps (default ``plumb.doctor.check_cadence``: ``max(1000, 20 * every)``) and when the block ends;
    ``diagnosis`` is the latest ``plumb.Diagnosis``, ``on_finding(finding, step)`` is
    called for each new finding. ``optimizer`` (one, or a list of them: for the lr each
    step used, and which parameters no optimizer holds) and
    ``classes`` (of a softmax cross-entropy loss; default: read from the loss's
    autograd graph) help it. With ``out``, the block's end writes ``out/report.html``
    (``report=False``: not) and, with the doctor, ``out/findings.json``.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 50,
        *,
        optimizer: Any = None,
        doctor: bool = False,
        classes: int | None = None,
        check_every: int | None = None,
        on_finding: Callable[[Finding, int], None] | None = None,
        report: bool = True,
        **probes: Any,
    ):
        probes.setdefault("watch_modes", bool(doctor))
        super().__init__(model, every, **probes)
        self.report = report
        self.doctor: Doctor | None = None
        if doctor:
            self.doctor = Doctor(
                self,
                optimizer=optimizer,
                classes=classes,
                check_every=check_every,
                on_finding=on_finding,
            )

    @property
    def diagnosis(self) -> Diagnosis | None:
        """The doctor's latest diagnosis (None before its first check, or without it)."""
        return self.doctor.diagnosis if self.doctor is not None else None

    def attach(self) -> None:
        super().attach()
        if self.doctor is not None:
            self.doctor.start()

    def step(self, loss: Any, measured: Any = None) -> None:
        super().step(loss, measured)
        if self.doctor is not None:
            self.doctor.observe(loss)

    def _repr_html_(self) -> str:
        """Jupyter: the record so far (flushed first) as ``plumb.load_run`` shows it when
        the Monitor writes to ``out``, else the steps, the latest loss and the diagnosis."""
        if self._attached:
            self.flush()
        if self.out is not None and (Path(self.out) / "probes" / "meta.json").is_file():
            return views.load_run(self.out)._repr_html_()
        loss = self.history.loss if self.history is not None else []
        head = f"<div><b>plumb Monitor</b> · {self.step_count:,} steps"
        if len(loss):
            head += f", last loss {float(loss[-1]):.4f}"
        head += "</div>"
        diag = self.diagnosis._repr_html_() if self.diagnosis is not None else ""
        return styled(head) + diag

    def __exit__(self, *exc: object) -> None:
        self.close(write_report=exc[0] is None, check=exc[0] in (None, KeyboardInterrupt))

    def close(self, write_report: bool = True, check: bool = True) -> None:
        """Detach, check once more (doctor), flush, and write findings and the report."""
        if not self._attached:
            return
        self._disarm()
        if self.doctor is not None and check and self.step_count:
            self.doctor.check()
        super().close(close_sinks=False)
        if self.rank != 0:  # under torch.distributed rank 0 writes
            return
        if self.out is not None:
            if self.diagnosis is not None:
                write_json(Path(self.out) / "findings.json", self.diagnosis.to_dict())
            if self.report and write_report:
                views.write_report(self.out)
        self._close_sinks()

    def _close_sinks(self) -> None:
        """Hand each sink the verdict (``findings``) and the run's files (``artifacts``)
        where it takes them, then close it."""
        from plumb.doctor.fixes import headline

        for sink in self.sinks:
            if self.diagnosis is not None and hasattr(sink, "findings"):
                found = [f.to_dict() for f in self.diagnosis.findings]
                sink.findings(headline(found, self.step_count), found, None)
            if self.out is not None and hasattr(sink, "artifacts"):
                sink.artifacts(Path(self.out))
            sink.close()
