"""plumb: makemore Part 3 (activations, gradients, BatchNorm) as software.

A character-level MLP language model built from from-scratch layers with principled
initialisation, trained on a names dataset; see the README for the CLI.
"""

from plumb._version import __version__
from plumb.data import Dataset, Vocab, load_dataset
from plumb.doctor import Diagnosis, Finding, diagnose
from plumb.errors import PlumbError
from plumb.init import calculate_gain, expected_initial_loss
from plumb.memory import reuse_freed_memory
from plumb.models import MLP, PRESETS, ModelConfig, preset_config
from plumb.monitor import Monitor
from plumb.pipeline import eval_run, sample_run, train_run
from plumb.probes import Probes
from plumb.record import Record
from plumb.report import RunView, load_run, write_report
from plumb.runs import Run
from plumb.train import Callbacks, Resume, TrainConfig, split_loss, train

#: integrations, imported on first use (``plumb.lightning.Doctor``): importing plumb never
#: imports Lightning, transformers, W&B or MLflow
_LAZY = ("lightning", "hf", "trackers")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"plumb.{name}")
    raise AttributeError(f"module 'plumb' has no attribute {name!r}")


__all__ = [
    "MLP",
    "PRESETS",
    "Callbacks",
    "Dataset",
    "Diagnosis",
    "Finding",
    "ModelConfig",
    "Monitor",
    "PlumbError",
    "Probes",
    "Record",
    "Resume",
    "Run",
    "RunView",
    "TrainConfig",
    "Vocab",
    "__version__",
    "calculate_gain",
    "diagnose",
    "eval_run",
    "expected_initial_loss",
    "load_dataset",
    "load_run",
    "preset_config",
    "reuse_freed_memory",
    "sample_run",
    "split_loss",
    "train",
    "train_run",
    "write_report",
]
