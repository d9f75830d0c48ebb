"""The main job end to end: `examples/quickstart.py` reaches its accuracy target and writes its outputs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_instruction_tunes_to_target(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    before = re.search(r"accuracy before instruction tuning: held-in ([\d.]+), held-out ([\d.]+)", result.stdout)
    after = re.search(r"accuracy after instruction tuning: held-in ([\d.]+), held-out ([\d.]+)", result.stdout)
    assert before and after, result.stdout[-3000:]
    assert float(after.group(1)) >= 0.8 > 0.3 >= float(before.group(1))  # chance is 1/4 (colour, shape), 1/16
    assert (tmp_path / "quickstart.png").stat().st_size > 10_000
    assert (tmp_path / "model" / "config.json").is_file()
    assert (tmp_path / "model" / "processor_config.json").is_file()
