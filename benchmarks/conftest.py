"""pytest hooks and fixtures of the benchmark suite; its machinery (contenders, timing, memory,
run metadata) is in benchmarks/harness.py, imported by the bench_*.py modules as
``benchmarks.harness``."""
import pytest
import torch

from benchmarks.harness import write_session_metadata


def pytest_sessionfinish(session, exitstatus):
    """The run's metadata beside the pytest-benchmark JSON, for report.py."""
    write_session_metadata(session.config.getoption("benchmark_json", None))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
