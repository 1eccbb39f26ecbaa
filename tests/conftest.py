import functools

import hyp  # noqa: F401  (the hypothesis profile, before any test module)
import pytest
import torch

from plumb.catalogue import SETUPS, Outcome, run_setup
from plumb.data import load_dataset


@functools.cache
def catalogue_outcome(name: str) -> Outcome:
    """One catalogue set-up diagnosed once per test session (several tests read it)."""
    return run_setup(next(s for s in SETUPS if s.name == name))


@pytest.fixture(scope="session")
def names():
    """The bundled names dataset, loaded once."""
    return load_dataset()


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
