"""The README's examples run as printed."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_python_api_snippet_runs_as_printed(tmp_path):
    (snippet,) = readme_python_blocks()
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test_accuracy_top1" in result.stdout
    # build_trainer's default work dir: work_dirs/<recipe name>
    assert (tmp_path / "work_dirs" / "cifar10_smoke").is_dir()
