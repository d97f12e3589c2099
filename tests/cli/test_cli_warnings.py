"""Warnings on the command line read like its errors: one line each, no Python source excerpt."""

from __future__ import annotations

import os
import subprocess
import sys

from PIL import Image


def test_a_link_loop_warning_is_one_gce_line(tmp_path):
    for c in range(3):
        for i in range(3):
            (tmp_path / f"c{c}").mkdir(exist_ok=True)
            Image.new("RGB", (24, 24), (80 * c, 30 * i, 90)).save(tmp_path / f"c{c}" / f"{i}.png")
    os.symlink("..", tmp_path / "c0" / "loop")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gce",
            "eval",
            "--backbone",
            "raw",
            "--dataset",
            "folder",
            "--root",
            str(tmp_path),
            "--image-size",
            "16",
            "--split",
            "train",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "links to folders" in line]
    assert warned and all(line.startswith("gce: warning: ") for line in warned), done.stderr
    assert "UserWarning" not in done.stderr and "return loader" not in done.stderr
