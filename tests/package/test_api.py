"""The public API: `import gce` is light, and the example of docs/api.md runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import gce

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_import_gce_loads_no_torch_and_every_public_name_resolves():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, gce; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "False", done.stderr
    for name in gce.__all__:
        assert getattr(gce, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gce.nope  # noqa: B018


def test_docs_api_describes_every_public_name():
    table = set(re.findall(r"^\| `gce\.(\w+)", DOC.read_text(), flags=re.MULTILINE))
    mentioned = set(re.findall(r"`(?:gce\.)?(\w+)", DOC.read_text()))
    assert table <= set(gce.__all__)
    assert set(gce.__all__) - {"__version__"} <= mentioned


@pytest.mark.slow
def test_the_example_of_docs_api_runs_as_written(tmp_path):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL).group(1)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"R@1 \d\.\d{3}  MAP@R \d\.\d{3}", done.stdout)
    assert (tmp_path / "runs" / "api-example" / "final_metrics.json").is_file()
