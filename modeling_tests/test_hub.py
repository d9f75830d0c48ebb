"""Hub publishing through the real push code path, down to the commit operations handed to huggingface_hub.

`HfApi.create_repo / file_exists / create_commit` are replaced by a recorder that writes each `CommitOperationAdd`
into a folder, and sockets refuse to connect, so nothing is sent; the folder is then loaded with
`trust_remote_code=True` in a fresh process that never imports hf_instructblip.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, RepoUrl
from safetensors.torch import load_file

import tiny
from hf_instructblip import (
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    freeze_for_instruction_tuning,
    load_trainable_weights,
)
from hf_instructblip.hub import LocalHubApi, model_card, push_to_hub, push_trainable_to_hub
import hf_instructblip.model

REPO = "someone/instructblip-tiny"
PROMPTS = ["what colour is the circle ?", "describe the image briefly ."]


class Recorder:
    """Stands in for the Hub: the operations of every commit, materialised under `root/<repo id>`."""

    def __init__(self, root: Path, existing: set[str] = frozenset()) -> None:
        self.root, self.existing = root, set(existing)
        self.commits: list[dict] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "Recorder":
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def file_exists(api, repo_id, filename, **kwargs):
            return filename in recorder.existing

        def create_commit(api, repo_id, operations, *, commit_message, **kwargs):
            operations = list(operations)
            assert all(isinstance(op, CommitOperationAdd) for op in operations)
            folder = recorder.root / repo_id
            for op in operations:  # the temporary source folder is gone after the push: copy the bytes now
                target = folder / op.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                with op.as_file() as handle:
                    target.write_bytes(handle.read())
            recorder.commits.append({"repo_id": repo_id, "paths": sorted(op.path_in_repo for op in operations),
                                     "message": commit_message, **kwargs})
            return "commit-info"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "file_exists", file_exists)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        return self


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (e.g. an upload path that bypasses `create_commit`)."""
    def refuse(sock, address):
        raise AssertionError(f"the push must not reach the network (connect to {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def hub(tmp_path, monkeypatch, no_network):
    return Recorder(tmp_path / "hub").install(monkeypatch)


def tiny_processor() -> InstructBlipProcessor:
    return InstructBlipProcessor(tiny.image_processor(), tiny.llm_tokenizer("llama"), tiny.qformer_tokenizer(),
                                 num_query_tokens=tiny.NUM_QUERY_TOKENS)


def tiny_model(processor: InstructBlipProcessor, seed: int = 0) -> InstructBlipForConditionalGeneration:
    kwargs = tiny.config_kwargs("llama", image_token_index=processor.image_token_id)
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(InstructBlipConfig(**kwargs))
    return tiny.randomize_(model, seed=seed).eval()


def local_imports(folder: Path, roots: set[str]) -> set[str]:
    """`roots` and every module of `folder` they reach through `from .x import` (ast, transitively)."""
    import ast

    found, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for node in ast.walk(ast.parse((folder / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                todo.append(f"{node.module}.py")
    return found


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# --- full model + processor ----------------------------------------------------------------------------------
def test_push_writes_a_folder_that_loads_with_remote_code_in_a_fresh_process(hub, tmp_path):
    processor = tiny_processor()
    model = tiny_model(processor)
    push_to_hub(model, REPO, processor, license="mit", datasets=["someone/shapes"], tags=["demo"])

    assert len(hub.commits) == 1, "model, processor and card go in one commit"
    paths = set(hub.commits[0]["paths"])
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json",
            "qformer_tokenizer/tokenizer.json", "README.md"} <= paths
    # The code shipped is the model's and the processor's modules in `hf_instructblip/model/` with what they import
    # (read from the sources here), nothing of training or evaluation.
    model_folder = Path(hf_instructblip.model.__file__).parent
    shipped = local_imports(model_folder, {"modeling.py", "processing.py"})
    assert {"configuration.py", "vision_encoder.py", "qformer.py", "loss.py", "images.py"} <= shipped
    assert {p for p in paths if p.endswith(".py")} == shipped
    for name in shipped:
        assert (hub.root / REPO / name).read_bytes() == (model_folder / name).read_bytes(), name
    folder = hub.root / REPO
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"} <= set(auto_map)
    assert "AutoProcessor" in json.loads((folder / "processor_config.json").read_text())["auto_map"]

    inputs = processor(images=tiny.images(2), text=PROMPTS, return_tensors="pt")
    torch.save({"inputs": dict(inputs), "logits": logits(model, inputs)}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["hf_instructblip"] = None  # importing the package now fails: the folder must suffice
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert sys.modules["hf_instructblip"] is None, "the package itself must not be needed"
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        inputs = processor(images=[__import__("PIL.Image").Image.open(p) for p in sys.argv[1:]],
                           text={PROMPTS!r}, return_tensors="pt")
        for key, value in expected["inputs"].items():
            torch.testing.assert_close(inputs[key], value, rtol=0, atol=0, msg=key)
        with torch.no_grad():  # tolerance: this process runs on another thread count
            torch.testing.assert_close(model(**inputs).logits, expected["logits"], atol=2e-5, rtol=1e-5)
        print("REMOTE-OK")
    """)
    image_paths = []
    for i, image in enumerate(tiny.images(2)):
        image.save(tmp_path / f"image{i}.png")
        image_paths.append(str(tmp_path / f"image{i}.png"))
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script, *image_paths], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]


def test_card_metadata_and_usage(hub):
    processor = tiny_processor()
    push_to_hub(tiny_model(processor), REPO, processor, base_model="Salesforce/instructblip-vicuna-7b",
                license="mit", datasets=["someone/shapes"], tags=["demo"])
    card = ModelCard.load(hub.root / REPO / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["base_model"] == "Salesforce/instructblip-vicuna-7b"
    assert data["license"] == "mit"
    assert data["datasets"] == ["someone/shapes"]
    assert {"instructblip", "demo"} <= set(data["tags"])
    assert "pip install hf-instructblip" in card.text
    assert f'AutoModel.from_pretrained("{REPO}", trust_remote_code=True)' in card.text
    assert f'AutoProcessor.from_pretrained("{REPO}", trust_remote_code=True)' in card.text


def test_base_model_defaults_to_the_hub_id_the_model_came_from(hub):
    processor = tiny_processor()
    model = tiny_model(processor)
    model.name_or_path = "Salesforce/instructblip-flan-t5-xl"  # as `from_pretrained(hub id)` sets it
    push_to_hub(model, REPO, processor)
    assert ModelCard.load(hub.root / REPO / "README.md").data.base_model == "Salesforce/instructblip-flan-t5-xl"


@pytest.mark.parametrize("overwrite_card", [False, True])
def test_an_existing_card_is_kept_unless_asked(tmp_path, monkeypatch, overwrite_card):
    recorder = Recorder(tmp_path / "hub", existing={"README.md"}).install(monkeypatch)
    processor = tiny_processor()
    push_to_hub(tiny_model(processor), REPO, processor, overwrite_card=overwrite_card)
    paths = recorder.commits[0]["paths"]
    assert ("README.md" in paths) is overwrite_card
    assert "model.safetensors" in paths


def test_commit_options_are_handed_through(hub):
    processor = tiny_processor()
    push_to_hub(tiny_model(processor), REPO, processor, commit_message="v2", create_pr=True,
                commit_description="retrained")
    commit = hub.commits[0]
    assert (commit["message"], commit["create_pr"], commit["commit_description"]) == ("v2", True, "retrained")


# --- trainable weights only ----------------------------------------------------------------------------------
def trained_copy(base_folder: Path, processor) -> InstructBlipForConditionalGeneration:
    """Load the saved base, freeze it for instruction tuning and move the trainable weights (a stand-in for
    training: the test only needs them to differ from the base)."""
    model = InstructBlipForConditionalGeneration.from_pretrained(base_folder).eval()
    freeze_for_instruction_tuning(model)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def test_trainable_push_applies_on_its_base(hub, tmp_path):
    processor = tiny_processor()
    tiny_model(processor).save_pretrained(tmp_path / "base")
    trained = trained_copy(tmp_path / "base", processor)
    push_trainable_to_hub(trained, "someone/qformer-delta", base_model=REPO, license="mit")

    assert hub.commits[0]["paths"] == ["README.md", "instructblip_trainable.safetensors"]
    folder = hub.root / "someone/qformer-delta"
    keys = set(load_file(str(folder / "instructblip_trainable.safetensors")))
    expected = {name for name, p in trained.named_parameters() if p.requires_grad}
    assert keys == expected
    assert all(k.startswith(("qformer.", "query_tokens", "language_projection.")) for k in keys)

    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == REPO and card.data.library_name == "hf_instructblip"
    assert card.data.pipeline_tag == "image-text-to-text"
    assert "load_trainable_weights" in card.text and f'AutoModel.from_pretrained("{REPO}")' in card.text

    inputs = processor(images=tiny.images(2), text=PROMPTS, return_tensors="pt")
    fresh = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    assert not torch.allclose(logits(fresh, inputs), logits(trained, inputs))
    load_trainable_weights(fresh, folder)
    torch.testing.assert_close(logits(fresh, inputs), logits(trained, inputs), atol=0, rtol=0)


def test_trainable_push_of_a_peft_model_carries_the_adapter(hub, tmp_path):
    peft = pytest.importorskip("peft")
    processor = tiny_processor()
    model = peft.get_peft_model(tiny_model(processor),
                                peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_alpha=4))
    freeze_for_instruction_tuning(model)
    push_trainable_to_hub(model, "someone/lora-delta", base_model=REPO)
    paths = hub.commits[0]["paths"]
    assert {"adapter_config.json", "adapter_model.safetensors", "instructblip_trainable.safetensors"} <= set(paths)
    trainable = load_file(str(hub.root / "someone/lora-delta/instructblip_trainable.safetensors"))
    assert trainable and not any("lora_" in key for key in trainable)  # adapters live in the PEFT file
    assert "PeftModel.from_pretrained" in (hub.root / "someone/lora-delta/README.md").read_text()


# --- the local stand-in (push.py --dry-run) ----------------------------------------------------------------
def test_local_hub_api_writes_what_a_push_sends(hub, tmp_path):
    processor = tiny_processor()
    model = tiny_model(processor)
    push_to_hub(model, REPO, processor, license="mit")
    local = LocalHubApi(tmp_path / "local")
    info = push_to_hub(model, REPO, processor, license="mit", api=local)
    assert info.oid and REPO in info.commit_url
    sent, written = hub.root / REPO, local.repo_folder(REPO)
    sent_files = sorted(p.relative_to(sent).as_posix() for p in sent.rglob("*") if p.is_file())
    written_files = sorted(p.relative_to(written).as_posix() for p in written.rglob("*") if p.is_file())
    assert sent_files == written_files == hub.commits[0]["paths"]
    for name in sent_files:
        assert (sent / name).read_bytes() == (written / name).read_bytes(), name
    # the folder now has a card: a second push keeps it
    push_to_hub(model, REPO, processor, api=local)
    assert "README.md" not in local.commits[-1][1]


def test_a_bare_repo_name_gets_the_users_namespace_in_the_card(tmp_path, no_network):
    processor = tiny_processor()
    local = LocalHubApi(tmp_path, user="alice")
    push_to_hub(tiny_model(processor), "shapes-model", processor, api=local)
    card = (tmp_path / "alice" / "shapes-model" / "README.md").read_text()
    assert 'AutoModel.from_pretrained("alice/shapes-model", trust_remote_code=True)' in card


# --- bad input -------------------------------------------------------------------------------------------
def test_bad_arguments_get_clear_errors(hub, monkeypatch):
    processor = tiny_processor()
    model = tiny_model(processor)
    monkeypatch.setattr(type(model), "save_pretrained", lambda *a, **k: pytest.fail("saved before validation"))
    with pytest.raises(ValueError, match="`repo_id` must be a Hub repo id"):
        push_to_hub(model, "not a/valid/id", processor)
    with pytest.raises(ValueError, match=r"`repo_id` must be a Hub repo id .*Cannot have -- or \.\."):
        push_to_hub(model, "someone/bad--name", processor)  # huggingface_hub's rule, not a character class
    with pytest.raises(TypeError, match="`processor` must have `save_pretrained`"):
        push_to_hub(model, REPO, processor="tokenizer")
    with pytest.raises(TypeError, match="`model` must be an InstructBlipForConditionalGeneration"):
        push_to_hub(torch.nn.Linear(2, 2), REPO)
    with pytest.raises(TypeError, match="`tags` must be a list of strings"):
        push_to_hub(model, REPO, tags="demo")
    with pytest.raises(ValueError, match="`base_model` is required"):
        push_trainable_to_hub(model, REPO)
    with pytest.raises(TypeError, match="`api` must be a huggingface_hub.HfApi"):
        push_to_hub(model, REPO, api=object())
    with pytest.raises(ValueError, match="`base_model` must be a Hub repo id"):
        model_card(REPO, base_model="/local/folder")
    assert hub.commits == []


def test_a_peft_model_is_not_pushed_as_a_full_model(hub):
    peft = pytest.importorskip("peft")
    processor = tiny_processor()
    model = peft.get_peft_model(tiny_model(processor), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="push_trainable_to_hub"):
        push_to_hub(model, REPO, processor)
