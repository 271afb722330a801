import os
import sys

import pytest
import torch

# testing.py sits beside the tests; the package itself must come from site-packages
# (the installed build with its extension), never from the source tree.
sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny convolutions run faster, far faster on shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    # Registered here, not only in pyproject.toml, so the suite also runs from a copy of
    # tests/ against an installed wheel (.ci/wheel_check.sh).
    config.addinivalue_line("markers", "slow: longer end-to-end tests")
