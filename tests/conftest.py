import pytest
import torch

from plumb.data import load_dataset


@pytest.fixture(scope="session")
def names():
    """The bundled names dataset, loaded once."""
    return load_dataset()


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
