"""Make the three top-level modules importable from the tests, whatever the working directory."""
import json
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


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_synth):
    """configs/tiny.json trained 12 steps on the session's SynthCXR, once per session, with its
    config file (for --checkpoint random). Tests that change the checkpoint copy it first."""
    import msd
    root = tmp_path_factory.mktemp("tiny")
    config = json.loads((ROOT / "configs" / "tiny.json").read_text())
    config.update(out_dir=str(root / "run"), synth_dir=str(tiny_synth), max_steps=12, progress=False)
    (root / "tiny.json").write_text(json.dumps(config))
    cfg = msd.load_config(root / "tiny.json")
    msd.pretrain(cfg)
    return {"root": root, "ckpt": root / "run" / "ckpt.pt", "config": root / "tiny.json", "cfg": cfg}
