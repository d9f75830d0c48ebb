"""Every example script runs on its embedded default (offline, few steps) and produces what it promises.

The scripts run as subprocesses, all started at once (most of each run is importing torch + transformers); a few
option variants run in-process through the scripts' `main(argv)`.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from safetensors.torch import load_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT = 240




def example(name: str):
    """An example script as a module (examples/ is not a package)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every script once with small settings; `runs[name]()` -> (completed process, output dir)."""
    root = tmp_path_factory.mktemp("examples")
    commands = {
        "generate": ["--output-json", str(root / "generate" / "answers.json")],
        "finetune": ["--steps", "3", "--output-dir", str(root / "finetune")],
        "finetune_lora": ["--steps", "3", "--output-dir", str(root / "finetune_lora")],
        "instruction_mixture": ["--steps", "4", "--batch-size", "4", "--output-dir", str(root / "instruction_mixture")],
        "push": ["--steps", "2", "--output-dir", str(root / "push")],
    }
    # One thread each: the models are tiny, and the runs share the machine's cores.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_MODULES_CACHE": str(root / "modules")}
    started = {name: subprocess.Popen([sys.executable, str(EXAMPLES / f"{name}.py"), *args], cwd=root, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, args in commands.items()}
    done: dict[str, subprocess.CompletedProcess] = {}

    def result(name: str) -> tuple[subprocess.CompletedProcess, Path]:
        if name not in done:
            process = started[name]
            stdout, stderr = process.communicate(timeout=TIMEOUT)
            done[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        completed = done[name]
        assert completed.returncode == 0, f"{name} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-3000:]}"
        return completed, root / name

    yield result
    for process in started.values():
        if process.poll() is None:
            process.kill()


# --- generate.py ------------------------------------------------------------------------------------------
def test_generate_answers_every_default_image(runs):
    completed, folder = runs("generate")
    rows = json.loads((folder / "answers.json").read_text())
    shapes = example("shapes")
    templates = {t for held_in, held_out, _ in shapes.TASKS.values() for t in held_in + held_out}
    assert len(rows) == 2 * len(shapes.TASKS)  # one held-in and one held-out instruction per task
    assert all(row["instruction"] in templates and isinstance(row["answer"], str) for row in rows)
    assert "num_beams': 5" in completed.stdout and "max_new_tokens': 256" in completed.stdout
    assert "model: the embedded untrained model" in completed.stdout  # no quickstart model in its folder


def test_generate_answers_with_the_quickstart_model_when_saved(tmp_path, monkeypatch, capsys, one_thread):
    """A model where the quickstart saves answers without `--model`, as it does when named."""
    generate, shapes = example("generate"), example("shapes")
    processor = shapes.build_processor()
    saved = tmp_path / "outputs" / "quickstart" / "model"
    shapes.build_model(processor, seed=5).save_pretrained(saved)
    processor.save_pretrained(saved)
    monkeypatch.chdir(tmp_path)
    answers = {}
    for name, flags in {"default": [], "named": ["--model", str(saved)]}.items():
        out = tmp_path / f"{name}.json"
        assert generate.main([*flags, "--max-new-tokens", "3", "--output-json", str(out)]) == 0
        answers[name] = json.loads(out.read_text())
    assert "model: outputs/quickstart/model (saved by examples/quickstart.py)" in capsys.readouterr().out
    assert answers["default"] == answers["named"]


def test_generate_presets_are_lavis_defaults():
    generate = example("generate")
    lavis = generate.generation_settings("lavis", sample=False)
    assert lavis == dict(num_beams=5, max_new_tokens=256, min_new_tokens=1, repetition_penalty=1.5,
                         length_penalty=1.0, do_sample=False)
    short = generate.generation_settings("short", sample=False)
    assert short == dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0, do_sample=False)
    assert generate.generation_settings("lavis", sample=True)["top_p"] == 0.9
    with pytest.raises(ValueError, match="`preset` must be one of"):
        generate.generation_settings("long", sample=False)


def test_generate_on_image_files_with_one_instruction(tmp_path, one_thread):
    generate, shapes = example("generate"), example("shapes")
    paths = []
    for i, record in enumerate(shapes.make_records("colour", 3, seed=7)):
        record["image"].save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    out = tmp_path / "answers.json"
    assert generate.main([*paths, "--instruction", "name the colour .", "--preset", "short",
                          "--max-new-tokens", "3", "--output-json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [row["image"] for row in rows] == paths
    assert all(row["instruction"] == "name the colour ." for row in rows)
    assert all(len(row["answer"].split()) <= 3 for row in rows)  # word-level vocabulary: one token per word
    with pytest.raises(ValueError, match="`--instruction`"):
        generate.main([*paths, "--instruction", "a", "--instruction", "b"])


# --- finetune.py ------------------------------------------------------------------------------------------
def test_finetune_trains_saves_and_reloads(runs):
    completed, folder = runs("finetune")
    lines = (folder / "data" / "train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 64 and all(set(row) == {"image", "question", "answer"} for row in rows)
    assert all((folder / "data" / row["image"]).is_file() for row in rows)  # paths relative to the file
    saved = {p.name for p in (folder / "model").iterdir()}
    assert {"model.safetensors", "config.json", "processor_config.json"} <= saved
    assert "over 3 steps" in completed.stdout
    assert "the reloaded model gives the same answers" in completed.stdout


def test_finetune_can_save_only_the_trainable_weights(tmp_path, one_thread):
    finetune = example("finetune")
    assert finetune.main(["--steps", "2", "--batch-size", "4", "--save-trainable-only",
                          "--output-dir", str(tmp_path)]) == 0
    saved = {p.name for p in (tmp_path / "model").iterdir()}
    assert "instructblip_trainable.safetensors" in saved and "model.safetensors" not in saved
    keys = load_file(str(tmp_path / "model" / "instructblip_trainable.safetensors"))
    assert keys and all(k.startswith(("qformer.", "query_tokens", "language_projection.")) for k in keys)


def test_finetune_rejects_rows_without_the_fields(tmp_path):
    finetune = example("finetune")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "x.png", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1 lacks \['answer'\]"):
        finetune.QuestionAnswerFile(tmp_path / "bad.jsonl")


# --- finetune_lora.py -------------------------------------------------------------------------------------
def test_finetune_lora_saves_adapter_and_qformer_and_reloads_them(runs):
    completed, folder = runs("finetune_lora")
    saved = {p.name for p in (folder / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "instructblip_trainable.safetensors"} <= saved
    adapter = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("language_model" in key and "lora_" in key for key in adapter)
    assert "answers and logits match" in completed.stdout


# --- instruction_mixture.py -------------------------------------------------------------------------------
def test_instruction_mixture_balances_three_sources(runs):
    completed, _ = runs("instruction_mixture")
    assert "BalancedConcatSampler: 3 datasets, 16 samples/epoch" in completed.stdout
    line = next(line for line in completed.stdout.splitlines() if line.startswith("samples seen per dataset"))
    seen = json.loads(line.split(": ", 1)[1].replace("'", '"'))
    assert set(seen) == {"shapes_vqa", "shapes_okvqa", "shapes_caption"} and sum(seen.values()) == 16


# --- push.py ----------------------------------------------------------------------------------------------
def test_push_dry_run_writes_both_repos(runs):
    completed, folder = runs("push")
    full, delta = folder / "your-name" / "instructblip-shapes", folder / "your-name" / "instructblip-shapes-qformer"
    assert {"model.safetensors", "config.json", "modeling.py", "processor_config.json", "README.md"} <= {
        p.name for p in full.iterdir()}
    assert {p.name for p in delta.iterdir()} == {"README.md", "instructblip_trainable.safetensors"}
    assert ModelCard.load(full / "README.md").data.library_name == "transformers"
    assert ModelCard.load(delta / "README.md").data.base_model == "your-name/instructblip-shapes"
    assert "reloaded with trust_remote_code: logits match" in completed.stdout
    assert "logits match" in completed.stdout.split("instructblip-shapes-qformer")[-1]


def test_push_trainable_only_needs_a_base(tmp_path, one_thread):
    push = example("push")
    with pytest.raises(ValueError, match="`base_model` is required"):
        push.main(["--trainable-only", "--steps", "1", "--output-dir", str(tmp_path)])


def test_model_flag_loads_the_official_layout(tmp_path):
    """`--model` with a folder in the official Salesforce layout (transformers' classes, `model_type:
    instructblip`, `processor_config.json` + `qformer_tokenizer/`) loads into ours and generates."""
    from transformers import InstructBlipConfig as RefConfig
    from transformers import InstructBlipForConditionalGeneration as RefModel
    from transformers import InstructBlipProcessor as RefProcessor

    shapes = example("shapes")
    processor = shapes.build_processor()
    ours = shapes.build_model(processor)
    kept = {k: v for k, v in ours.config.to_dict().items()
            if k not in ("model_type", "auto_map", "instruction_aware", "architectures", "transformers_version")}
    reference = RefModel(RefConfig(**kept))
    reference.load_state_dict(ours.state_dict())
    reference.save_pretrained(tmp_path)
    RefProcessor(processor.image_processor, processor.tokenizer, processor.qformer_tokenizer,
                 num_query_tokens=shapes.NUM_QUERY_TOKENS).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "instructblip"
    out = tmp_path / "answers.json"
    assert example("generate").main(["--model", str(tmp_path), "--max-new-tokens", "2",
                                     "--output-json", str(out)]) == 0
    assert len(json.loads(out.read_text())) > 0
