import os
import sys

import pytest
import torch

# tests/tiny.py and friends are plain modules next to the tests.
sys.path.insert(0, os.path.dirname(__file__))
# No test may reach the network: the Hub is only ever a local cache here.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The models here are tiny: a second thread buys nothing and, on a shared 2-core machine,
# makes every small op wait for a busy core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# The versions header and the newest-releases check's oracle triage (.ci/newest): tests/newest_check.py.
from newest_check import pytest_report_header, pytest_runtest_makereport, pytest_terminal_summary  # noqa: E402,F401
