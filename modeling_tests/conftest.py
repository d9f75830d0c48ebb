"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run as fast on one intra-op thread, and oversubscribed threads on a small shared machine are
    many times slower (spin-waiting), so the whole suite uses one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
