import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


# Files whose module- or session-scoped fixtures train or run something: under pytest-xdist each runs in
# one worker (``--dist loadgroup``), so that the fixture is computed once.
SHARED_FIXTURES = ("test_experiments", "test_extensions", "test_gpu_script", "test_mistakes", "test_promises",
                   "test_robustness")


def pytest_configure(config):
    if hasattr(config, "workerinput"):   # a pytest-xdist worker: one process per core, one thread each
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.stem
        if name in SHARED_FIXTURES:
            item.add_marker(pytest.mark.xdist_group(name))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
