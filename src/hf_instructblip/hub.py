"""Hub publishing: model + processor + model card in one commit, or only the trainable weights (the Q-Former delta).

`push_to_hub` saves what transformers' `model.push_to_hub` saves (safetensors, `config.json` with `auto_map` and
our code files: `trust_remote_code=True` loads it without this package), the processor and a card (`library_name:
transformers`), and hands the folder to `HfApi.create_commit` once: a repo never holds a model without its
processor or card. A trainable-only repo is no checkpoint on its own: its card says `library_name: hf_instructblip`.

`api`: any `huggingface_hub.HfApi` (default `HfApi(token=token)`); `LocalHubApi` writes each commit to a local
folder instead of sending it (dry runs, offline demos).
"""

from __future__ import annotations

import os
import tempfile
from functools import partial
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, ModelCardData, RepoUrl
from torch import nn

from .hub_ids import is_hub_id, repo_id_problem
from .templates import generation_preset
from .training.freezing import TRAINABLE_WEIGHTS_NAME, instructblip_base, save_trainable_weights

CARD_NAME = "README.md"
PIPELINE_TAG = "image-text-to-text"
DEFAULT_TAGS = ("instructblip", "hf_instructblip", "vision-language", "image-to-text")
PAPER = "https://arxiv.org/abs/2305.06500"


# --- argument checks ------------------------------------------------------------------------------------------
def _check_repo_id(name: str, value: Any) -> str:
    problem = repo_id_problem(value)
    if problem is not None:
        raise ValueError(f"`{name}` must be a Hub repo id such as 'user/name', found {value!r} ({problem}).")
    return value


def _check_strings(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"`{name}` must be a list of strings or None, found {value!r}.")
    return list(value)


def _check_api(api: Any, token: str | bool | None) -> HfApi:
    if api is None:
        return HfApi(token=token)
    if not isinstance(api, HfApi):
        raise TypeError(f"`api` must be a huggingface_hub.HfApi (or LocalHubApi) or None, found {type(api).__name__}.")
    return api


def _check_processor(processor: Any) -> None:
    if processor is not None and not callable(getattr(processor, "save_pretrained", None)):
        raise TypeError(f"`processor` must have `save_pretrained` (an InstructBlipProcessor) or be None, "
                        f"found {type(processor).__name__}.")


def _hub_base_model(model: nn.Module) -> str | None:
    """The Hub id the model was loaded from, if any (local folders and fresh models give None)."""
    name = getattr(instructblip_base(model), "name_or_path", "") or ""
    return name if is_hub_id(name) and not os.path.exists(name) else None


# --- model cards ------------------------------------------------------------------------------------------
# The usage snippet's `generate` settings: LAVIS's preset, from the package data (templates).
_LAVIS_SETTINGS = ", ".join(f"{key}={value!r}" for key, value in generation_preset("lavis").items())


def _card(body: str, library_name: str, base_model: str | None, license: str | None, datasets: list[str],
          tags: list[str]) -> ModelCard:
    """YAML metadata, `body` and a licence note."""
    data = ModelCardData(
        library_name=library_name, pipeline_tag=PIPELINE_TAG, base_model=base_model, license=license or "other",
        datasets=datasets or None, tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
    )
    licence = (f"Licence: `{license}`." if license else
               "Licence: `other`: the weights inherit the licences of their components (the base LLM's licence "
               "applies, e.g. LLaMA / Vicuna terms or Apache-2.0 for Flan-T5); set `license=` when you push.")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n\n{licence}\n")


def model_card(repo_id: str, *, base_model: str | None = None, license: str | None = None,
               datasets: Sequence[str] | None = None, tags: Sequence[str] | None = None) -> ModelCard:
    """The card of a full model + processor repo (`library_name: transformers`).

    Example:
        >>> card = model_card("me/instructblip-shapes", base_model="Salesforce/instructblip-flan-t5-xl", license="mit")
        >>> card.data.pipeline_tag
        'image-text-to-text'
    """
    _check_repo_id("repo_id", repo_id)
    if base_model is not None:
        _check_repo_id("base_model", base_model)
    datasets, tags = _check_strings("datasets", datasets), _check_strings("tags", tags)
    origin = f"Fine-tuned from [`{base_model}`](https://huggingface.co/{base_model}). " if base_model else ""
    body = f"""
# {repo_id.split("/")[-1]}

InstructBLIP ([Dai et al., 2023]({PAPER})): a frozen image encoder, an instruction-aware Q-Former and a frozen
LLM. {origin}Saved with [`hf-instructblip`](https://pypi.org/project/hf-instructblip/), a transformers plugin.

## Usage

With the package (`pip install hf-instructblip`), the model loads natively:

```python
import hf_instructblip  # registers the Auto classes
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}")
processor = AutoProcessor.from_pretrained("{repo_id}")
inputs = processor(images=image, text="What is unusual about this image?", return_tensors="pt")
generated = model.generate(**inputs, {_LAVIS_SETTINGS})  # LAVIS's defaults
print(processor.post_process_generation(generated, inputs["input_ids"]))  # decoder-only LLMs echo the prompt
# encoder-decoder (Flan-T5) LLMs: processor.post_process_generation(generated)
```

Without it, the code files in this repo are used:

```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
```
"""
    return _card(body, "transformers", base_model, license, datasets, tags)


def trainable_card(repo_id: str, base_model: str, *, peft_adapter: bool = False, license: str | None = None,
                   datasets: Sequence[str] | None = None, tags: Sequence[str] | None = None) -> ModelCard:
    """The card of a trainable-only repo: how to apply `instructblip_trainable.safetensors` to `base_model`.

    Example:
        >>> trainable_card("me/qformer-delta", "Salesforce/instructblip-vicuna-7b").data.base_model
        'Salesforce/instructblip-vicuna-7b'
    """
    _check_repo_id("repo_id", repo_id)
    _check_repo_id("base_model", base_model)
    datasets, tags = _check_strings("datasets", datasets), [*_check_strings("tags", tags), "trainable-weights-only"]
    peft_line = (f'model = PeftModel.from_pretrained(model, "{repo_id}")  # the LoRA adapter on the LLM\n'
                 if peft_adapter else "")
    peft_import = "from peft import PeftModel\n" if peft_adapter else ""
    body = f"""
# {repo_id.split("/")[-1]}

Only the weights that InstructBLIP instruction tuning trains ([Dai et al., 2023]({PAPER})): the Q-Former, its
query tokens and the language projection (`{TRAINABLE_WEIGHTS_NAME}`){", plus a PEFT adapter" if peft_adapter else ""}.
They apply to the base model [`{base_model}`](https://huggingface.co/{base_model}); on their own they are not a
checkpoint.

## Usage

`pip install hf-instructblip`, then load the base and apply the trained weights on top:

```python
import hf_instructblip
from hf_instructblip import load_trainable_weights
from huggingface_hub import hf_hub_download
{peft_import}from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{base_model}")
processor = AutoProcessor.from_pretrained("{base_model}")
load_trainable_weights(model, hf_hub_download("{repo_id}", "{TRAINABLE_WEIGHTS_NAME}"))
{peft_line}```

Without the package (base loaded with `trust_remote_code=True`), the file is a plain safetensors state dict
with the model's own key names:

```python
from safetensors.torch import load_file

model.load_state_dict(load_file(hf_hub_download("{repo_id}", "{TRAINABLE_WEIGHTS_NAME}")), strict=False)
```
"""
    return _card(body, "hf_instructblip", base_model, license, datasets, tags)


# --- pushing ----------------------------------------------------------------------------------------------
def _push(api: HfApi, repo_id: str, write_files: Callable[[Path], Any], make_card: Callable[[str], ModelCard], *,
          overwrite_card: bool, private: bool | None, revision: str | None, **commit: Any) -> Any:
    """Write the files into a temporary folder, create the repo, add the card unless one exists there (and
    `overwrite_card` is False), and upload the folder in one commit (`commit`: `create_commit`'s options)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_files(folder)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # a bare name -> user/name
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if overwrite_card or not api.file_exists(repo_id, CARD_NAME, revision=revision):
            make_card(repo_id).save(folder / CARD_NAME)
        operations = [CommitOperationAdd(path_or_fileobj=str(path), path_in_repo=path.relative_to(folder).as_posix())
                      for path in sorted(folder.rglob("*")) if path.is_file()]
        # Not `api.upload_folder`: with hf_xet installed, huggingface_hub (2.4 at least) uploads a folder through
        # a pipeline that may split it into several commits and never calls `create_commit` (so LocalHubApi
        # would reach the network).
        return api.create_commit(repo_id, operations, revision=revision, **commit)


def push_to_hub(
    model: nn.Module, repo_id: str, processor: Any = None, *, base_model: str | None = None,
    license: str | None = None, datasets: Sequence[str] | None = None, tags: Sequence[str] | None = None,
    overwrite_card: bool = False, private: bool | None = None, revision: str | None = None, create_pr: bool = False,
    commit_message: str = "Upload InstructBLIP model, processor and card", commit_description: str | None = None,
    max_shard_size: str | int = "5GB", token: str | bool | None = None, api: HfApi | None = None,
) -> Any:
    """Push model + processor + model card to `repo_id` in one commit; returns the `CommitInfo`. `base_model`
    defaults to the Hub id the model was loaded from (none for local or fresh models).

    Example:
        >>> push_to_hub(model, "me/instructblip-shapes", processor, license="mit", datasets=["my/vqa"])
        >>> # anyone: AutoModel.from_pretrained("me/instructblip-shapes", trust_remote_code=True)
    """
    _check_repo_id("repo_id", repo_id)
    _check_processor(processor)
    if not isinstance(overwrite_card, bool):
        raise TypeError(f"`overwrite_card` must be a bool, found {type(overwrite_card).__name__}.")
    base = instructblip_base(model)
    if base is not model:
        raise ValueError("`model` is a PEFT model: push its adapter + trainable weights with push_trainable_to_hub, "
                         "or merge the adapter first (`model = model.merge_and_unload()`).")
    card = partial(model_card, base_model=base_model or _hub_base_model(base), license=license, datasets=datasets,
                   tags=tags)
    card(repo_id)  # fail before saving

    def write_files(folder: Path) -> None:
        base.save_pretrained(folder, max_shard_size=max_shard_size)  # safetensors + config(auto_map) + code
        if processor is not None:
            processor.save_pretrained(folder)

    return _push(_check_api(api, token), repo_id, write_files, card, overwrite_card=overwrite_card, private=private,
                 revision=revision, create_pr=create_pr, commit_message=commit_message,
                 commit_description=commit_description)


def push_trainable_to_hub(
    model: nn.Module, repo_id: str, *, base_model: str | None = None, processor: Any = None,
    license: str | None = None, datasets: Sequence[str] | None = None, tags: Sequence[str] | None = None,
    overwrite_card: bool = False, private: bool | None = None, revision: str | None = None, create_pr: bool = False,
    commit_message: str = "Upload InstructBLIP trainable weights and card", commit_description: str | None = None,
    token: str | bool | None = None, api: HfApi | None = None,
) -> Any:
    """Push only the trained weights (`instructblip_trainable.safetensors`, the Q-Former delta; plus the adapter
    of a PEFT model) with a card that says how to load them on `base_model` (default: the Hub id the model was
    loaded from; one of the two is required); returns the `CommitInfo`.

    Example:
        >>> freeze_for_instruction_tuning(model); trainer.train()
        >>> push_trainable_to_hub(model, "me/qformer-delta", base_model="Salesforce/instructblip-vicuna-7b")
    """
    _check_repo_id("repo_id", repo_id)
    _check_processor(processor)
    base = instructblip_base(model)
    base_model = base_model or _hub_base_model(base)
    if base_model is None:
        raise ValueError("`base_model` is required: the trainable weights only make sense on their base, and the "
                         "model was not loaded from a Hub id; pass base_model='user/name'.")
    peft_adapter = base is not model  # a PEFT model: its adapter is saved by PEFT itself
    card = partial(trainable_card, base_model=base_model, peft_adapter=peft_adapter, license=license,
                   datasets=datasets, tags=tags)
    card(repo_id)  # fail before saving

    def write_files(folder: Path) -> None:
        if peft_adapter:
            model.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors
        save_trainable_weights(model, folder)
        if processor is not None:
            processor.save_pretrained(folder)

    return _push(_check_api(api, token), repo_id, write_files, card, overwrite_card=overwrite_card, private=private,
                 revision=revision, create_pr=create_pr, commit_message=commit_message,
                 commit_description=commit_description)


# --- a local stand-in for the Hub -------------------------------------------------------------------------
class LocalHubApi(HfApi):
    """An `HfApi` whose repos are folders under `root` (`root/<user>/<name>`): nothing is sent. The push functions
    run unchanged down to `create_commit`, which writes the folder a push would upload.

    Example:
        >>> api = LocalHubApi("outputs/dry-run")
        >>> push_to_hub(model, "me/instructblip-shapes", processor, api=api)
        >>> AutoModel.from_pretrained(api.repo_folder("me/instructblip-shapes"), trust_remote_code=True)
    """

    def __init__(self, root: str | os.PathLike, user: str = "local-user") -> None:
        super().__init__(token=False)
        self.root, self.user = Path(root), user
        self.commits: list[tuple[str, list[str]]] = []  # (repo id, paths written) per commit

    def _full_id(self, repo_id: str) -> str:
        return repo_id if "/" in repo_id else f"{self.user}/{repo_id}"

    def repo_folder(self, repo_id: str) -> Path:
        """The folder that stands for `repo_id`."""
        return self.root / self._full_id(_check_repo_id("repo_id", repo_id))

    def create_repo(self, repo_id: str, **kwargs: Any) -> RepoUrl:
        self.repo_folder(repo_id).mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"{self.endpoint}/{self._full_id(repo_id)}", endpoint=self.endpoint)

    def create_branch(self, repo_id: str, **kwargs: Any) -> None:
        return None  # one folder per repo: branches are not modelled

    def file_exists(self, repo_id: str, filename: str, **kwargs: Any) -> bool:
        return (self.repo_folder(repo_id) / filename).is_file()

    def create_commit(self, repo_id: str, operations: Iterable[Any], *, commit_message: str,
                      commit_description: str | None = None, **kwargs: Any) -> CommitInfo:
        folder, written = self.repo_folder(repo_id), []
        for operation in operations:
            if not isinstance(operation, CommitOperationAdd):
                raise TypeError(f"`operations`: only CommitOperationAdd can be written, found "
                                f"{type(operation).__name__}.")
            target = folder / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            with operation.as_file() as source:
                target.write_bytes(source.read())
            written.append(operation.path_in_repo)
        self.commits.append((self._full_id(repo_id), written))
        oid = "0" * 40  # no history is kept: the folder is the latest commit
        return CommitInfo(commit_url=f"{self.endpoint}/{self._full_id(repo_id)}/commit/{oid}",
                          commit_message=commit_message, commit_description=commit_description or "", oid=oid)
