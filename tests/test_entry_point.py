"""``python -m esa`` is the same program as the ``esa`` script."""

import subprocess
import sys


def test_python_m_esa_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "esa", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("baseline", "profile", "perturb", "report", "run"):
        assert command in out.stdout
