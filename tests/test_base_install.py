"""The main job runs on the base install (`pip install dreamlip`, no extras), simulated by
tests/base_install.py: the linear probe of `dreamlip eval` and `dreamlip demo` needs no extra."""

import subprocess
import sys
from pathlib import Path

BASE_INSTALL = Path(__file__).with_name("base_install.py")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BASE_INSTALL), "-c", code], capture_output=True, text=True)


def test_the_simulated_base_install_lacks_the_extras():
    done = _python("import httpx")
    assert done.returncode == 1 and "No module named 'httpx' (not part of the base install)" in done.stderr


def test_linear_probe_runs_on_the_base_install():
    code = """
import numpy as np
from dreamlip.eval.linear_probe import linear_probe
labels = np.repeat([0, 1, 2], 20)
features = np.random.default_rng(0).normal(size=(60, 4)) + 6 * np.eye(3, 4)[labels]
print(linear_probe(features[::2], labels[::2], features[1::2], labels[1::2], C=1.0)["top1"])
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) == 100.0  # three clusters 6 standard deviations apart
