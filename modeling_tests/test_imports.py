"""What `import hf_instructblip` costs and exposes: the model, configuration and processor only (training, evaluation,
TRL, PEFT, bitsandbytes load on first use), nothing printed, every public name still reachable and listed; and the
package's layering: no import cycle between its subpackages, no private name imported across modules."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import hf_instructblip

PACKAGE = Path(hf_instructblip.__file__).parent
HEAVY = ("peft", "trl", "datasets", "deepspeed", "bitsandbytes", "transformers.trainer")


def fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


def test_import_loads_no_training_stack_and_prints_nothing():
    done = fresh_python(
        "import sys, json\nimport hf_instructblip\n"
        "from transformers import AutoConfig\n"
        f"print(json.dumps([m for m in {HEAVY!r} + ('hf_instructblip.training', 'hf_instructblip.evaluate') "
        "if m in sys.modules]))")
    assert done.stdout.strip() == "[]" and done.stderr == ""


def test_lazy_names_load_on_use():
    done = fresh_python(
        "import sys\nimport hf_instructblip\n"
        "from hf_instructblip import InstructBlipTrainer, generation_metrics, rank_candidates\n"
        "print(InstructBlipTrainer.__module__, generation_metrics.__module__, 'transformers.trainer' in sys.modules)")
    assert done.stdout.split() == ["hf_instructblip.training.trainer", "hf_instructblip.evaluate.generation_metrics",
                                   "True"]


def _type_checking_imports() -> dict[str, str]:
    """name -> module of the `if TYPE_CHECKING:` imports in the package's `__init__.py`."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
                 "TYPE_CHECKING")
    return {alias.name: "." * node.level + node.module for node in block.body for alias in node.names}


def test_lazy_table_matches_type_checking_imports_and_all_resolve():
    lazy = hf_instructblip._LAZY
    assert _type_checking_imports() == lazy
    assert sorted(hf_instructblip.__all__) == hf_instructblip.__all__
    assert set(lazy) - {"InstructBlipSFTTrainer"} <= set(hf_instructblip.__all__) <= set(dir(hf_instructblip))
    for name in hf_instructblip.__all__:
        getattr(hf_instructblip, name)  # every listed name loads
    with pytest.raises(AttributeError, match="has no attribute 'NotAName'"):
        hf_instructblip.NotAName  # noqa: B018


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every relative import in a module of the package."""
    relative = path.relative_to(PACKAGE.parent).with_suffix("").parts
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = relative[: len(relative) - node.level]
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.append((module, [alias.name for alias in node.names]))
    return found


def test_layering_no_private_names_no_cycles_between_subpackages():
    subpackage_edges, private = set(), []
    for path in PACKAGE.rglob("*.py"):
        own = path.relative_to(PACKAGE).parts[0]
        for module, names in _imports(path):
            private += [f"{path.relative_to(PACKAGE)}: {module}.{n}" for n in names if n.startswith("_")]
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else ""
            if own != target and not own.endswith(".py"):  # between subpackages, not top-level modules
                subpackage_edges.add((own, target))
    assert private == []
    assert ("model", "training") not in subpackage_edges and ("model", "evaluate") not in subpackage_edges
    assert not {("training", "evaluate"), ("evaluate", "training")} & subpackage_edges
    cycles = [(a, b) for a, b in subpackage_edges if (b, a) in subpackage_edges]
    assert cycles == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_under_350_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 350, f"{path.name}: {lines} lines"


def test_bench_import_smoke():
    bench = PACKAGE.parents[1] / "bench" / "bench_import.py"
    done = subprocess.run([sys.executable, str(bench), "--reps", "1"], capture_output=True, text=True, check=True,
                          cwd=bench.parent)
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["metric"] == "import_s" and record["ours"]["median"] > 0 and record["theirs"]["median"] > 0
    assert record["heavy_modules_loaded"] == [] and record["printed"] == ""
