"""Every Python snippet of README.md runs, in order, as written, against a small local checkpoint.

The checkpoint id of the README (`Salesforce/instructblip-vicuna-7b`) is a relative path here, where the test
saves the examples' small shapes model under that name (and tiny random BLIP-2, LLM and BERT folders under the BLIP-2
start's ids), and `photo.jpg` is a procedural image: nothing downloads.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import shapes  # noqa: E402

import blip2_sources  # noqa: E402


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_the_two_command_quick_start():
    text = (ROOT / "README.md").read_text()
    quick_start = re.search(r"## Quick start.*?```bash\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
    assert len(quick_start) == 2
    assert quick_start[0].endswith("python examples/quickstart.py")
    assert quick_start[1] == "python -m pytest modeling_tests"
    assert "python -m pytest modeling_tests" in (ROOT / ".ci" / "run").read_text()


def test_ci_installs_what_the_readme_installs_from_the_lock():
    """A newcomer's install is CI's: the same `pip install` arguments, each pinned by constraints.txt."""
    text = (ROOT / "README.md").read_text()
    first = re.search(r"## Quick start.*?```bash\n(.*?)\n", text, flags=re.S).group(1)
    readme = [step.strip().removeprefix("pip install ") for step in first.split("&&")
              if step.strip().startswith("pip install ")]
    ci = [line.split("#")[0].strip().removeprefix("python -m pip install --quiet ")
          for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python -m pip install")]
    assert readme == ci and len(ci) == 3
    assert "bash .ci/fetch_lavis_wheel.sh" in first and "bash .ci/fetch_lavis_wheel.sh" in (ROOT / ".ci" / "run").read_text()
    assert all(args.startswith("-c constraints.txt ") for args in ci)
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["torch"] == "2.13.0" and "hf-instructblip" not in pins and "lmms_eval" in pins


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    snippets = python_snippets()
    assert len(snippets) >= 3
    processor = shapes.build_processor()
    model = shapes.build_model(processor)
    checkpoint = tmp_path / "Salesforce" / "instructblip-vicuna-7b"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    shapes.draw_shape("red", "circle", np.random.default_rng(0)).save(tmp_path / "photo.jpg")
    # The BLIP-2 start's ids, as tiny random local folders of the same names.
    blip2_sources.blip2_folder(tmp_path / "Salesforce" / "blip2-flan-t5-xl", "opt")
    blip2_sources.blip2_folder(tmp_path / "Salesforce" / "blip2-itm-vit-g", stage=1)
    blip2_sources.llm_folder(tmp_path / "Qwen" / "Qwen2.5-7B-Instruct", "llama")
    blip2_sources.bert_folder(tmp_path / "bert-base-uncased")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert (tmp_path / "outputs" / "finetune").is_dir()
    pushed = tmp_path / "outputs" / "hub" / "me"
    assert (pushed / "instructblip-finetuned" / "config.json").is_file()
    assert (pushed / "instructblip-qformer-delta" / "instructblip_trainable.safetensors").is_file()
