"""Make the three top-level modules importable from the tests, whatever the working directory."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes tens of seconds (it still runs in CI)")


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """The folder of configs/tiny.json's SynthCXR, generated once per session by its first user
    and shared by the test modules that only read it; a test that changes image files or the
    manifest makes a folder of its own."""
    return tmp_path_factory.mktemp("synth_shared") / "synthcxr_tiny"
