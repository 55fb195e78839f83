"""Make the three top-level modules importable from the tests, whatever the working directory."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes tens of seconds (it still runs in CI)")
