import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for modules of tiny models: on a busy 2-core machine a second OpenMP thread only adds
    contention (up to ~20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
