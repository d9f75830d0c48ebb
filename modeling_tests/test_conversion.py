"""LAVIS -> HF conversion (conversion/): parity with transformers' InstructBLIP, bit-exactness, refusals.

The LAVIS-layout state dicts are built here from the LAVIS layout itself (reference/lavis_checkpoint_layout.md),
independently of the converter's rule table; the oracle is transformers' InstructBLIP loaded from the same
weights mapped by hand.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers import InstructBlipConfig as OracleConfig
from transformers import InstructBlipForConditionalGeneration as OracleModel

import tiny
from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conversion"))
import convert_lavis_checkpoint as cli  # noqa: E402
from hf_instructblip.conversion.checkpoint_io import load_state_dict_file  # noqa: E402
from flavours import FLAVOURS, model_config_kwargs, text_config_for  # noqa: E402
from hf_instructblip.conversion.lavis_mapping import ConversionError, TargetSpec, convert_state_dict  # noqa: E402

KINDS = ("llama", "t5")
ROOT = Path(__file__).resolve().parents[1]


# --- the LAVIS layout, written from the layout document ---------------------------------------------------
def lavis_layout(config) -> list[tuple[str, str, tuple[int, ...]]]:
    """(LAVIS key, HF key, shape) for the ViT, ln_vision, queries, Q-Former and projection (not q/v bias, LLM)."""
    v, q = config.vision_config, config.qformer_config
    dv, dq, dl = v.hidden_size, q.hidden_size, config.text_config.hidden_size
    patches = (v.image_size // v.patch_size) ** 2
    rows = [
        ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding", (1, 1, dv)),
        ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding", (1, patches + 1, dv)),
        ("visual_encoder.patch_embed.proj.weight", "vision_model.embeddings.patch_embedding.weight",
         (dv, 3, v.patch_size, v.patch_size)),
        ("visual_encoder.patch_embed.proj.bias", "vision_model.embeddings.patch_embedding.bias", (dv,)),
        ("ln_vision.weight", "vision_model.post_layernorm.weight", (dv,)),
        ("ln_vision.bias", "vision_model.post_layernorm.bias", (dv,)),
        ("query_tokens", "query_tokens", (1, config.num_query_tokens, dq)),
        ("Qformer.bert.embeddings.word_embeddings.weight", "qformer.embeddings.word_embeddings.weight",
         (q.vocab_size, dq)),
        ("Qformer.bert.embeddings.position_embeddings.weight", "qformer.embeddings.position_embeddings.weight",
         (q.max_position_embeddings, dq)),
        ("Qformer.bert.embeddings.LayerNorm.weight", "qformer.embeddings.layernorm.weight", (dq,)),
        ("Qformer.bert.embeddings.LayerNorm.bias", "qformer.embeddings.layernorm.bias", (dq,)),
        (f"{llm_prefix(config)}_proj.weight", "language_projection.weight", (dl, dq)),
        (f"{llm_prefix(config)}_proj.bias", "language_projection.bias", (dl,)),
    ]
    for i in range(v.num_hidden_layers):
        src, dst = f"visual_encoder.blocks.{i}", f"vision_model.encoder.layers.{i}"
        rows += [(f"{src}.attn.qkv.weight", f"{dst}.self_attn.qkv.weight", (3 * dv, dv))]
        for a, b, shapes in (("norm1", "layer_norm1", ((dv,), (dv,))), ("norm2", "layer_norm2", ((dv,), (dv,))),
                             ("attn.proj", "self_attn.projection", ((dv, dv), (dv,))),
                             ("mlp.fc1", "mlp.fc1", ((v.intermediate_size, dv), (v.intermediate_size,))),
                             ("mlp.fc2", "mlp.fc2", ((dv, v.intermediate_size), (dv,)))):
            rows += [(f"{src}.{a}.weight", f"{dst}.{b}.weight", shapes[0]),
                     (f"{src}.{a}.bias", f"{dst}.{b}.bias", shapes[1])]
    for i in range(q.num_hidden_layers):
        src, dst = f"Qformer.bert.encoder.layer.{i}", f"qformer.encoder.layer.{i}"
        blocks = [("attention", dq)] + ([("crossattention", dv)] if i % q.cross_attention_frequency == 0 else [])
        for name, kv_width in blocks:
            for proj, width in (("query", dq), ("key", kv_width), ("value", kv_width)):
                rows += [(f"{src}.{name}.self.{proj}.weight", f"{dst}.{name}.attention.{proj}.weight", (dq, width)),
                         (f"{src}.{name}.self.{proj}.bias", f"{dst}.{name}.attention.{proj}.bias", (dq,))]
            for part, shape in (("dense.weight", (dq, dq)), ("dense.bias", (dq,)), ("LayerNorm.weight", (dq,)),
                                ("LayerNorm.bias", (dq,))):
                rows += [(f"{src}.{name}.output.{part}", f"{dst}.{name}.output.{part}", shape)]
        for suffix in ("", "_query"):
            rows += [
                (f"{src}.intermediate{suffix}.dense.weight", f"{dst}.intermediate{suffix}.dense.weight",
                 (q.intermediate_size, dq)),
                (f"{src}.intermediate{suffix}.dense.bias", f"{dst}.intermediate{suffix}.dense.bias",
                 (q.intermediate_size,)),
                (f"{src}.output{suffix}.dense.weight", f"{dst}.output{suffix}.dense.weight", (dq, q.intermediate_size)),
                (f"{src}.output{suffix}.dense.bias", f"{dst}.output{suffix}.dense.bias", (dq,)),
                (f"{src}.output{suffix}.LayerNorm.weight", f"{dst}.output{suffix}.LayerNorm.weight", (dq,)),
                (f"{src}.output{suffix}.LayerNorm.bias", f"{dst}.output{suffix}.LayerNorm.bias", (dq,)),
            ]
    return rows


def llm_prefix(config) -> str:
    return "llm" if config.use_decoder_only_language_model else "t5"


def llm_state_dict(config, gen: torch.Generator, meta: bool = False) -> dict[str, torch.Tensor]:
    """The HF LLM's own state dict, as LAVIS holds it (Flan-T5: own LM head; LLaMA: inv_freq buffers)."""
    llm_class = AutoModelForCausalLM if config.use_decoder_only_language_model else AutoModelForSeq2SeqLM
    with torch.device("meta" if meta else "cpu"):
        llm = llm_class.from_config(config.text_config)
    sd = llm.state_dict()
    if not meta:
        sd = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in sd.items()}
    if config.use_decoder_only_language_model:
        head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
        device = sd["lm_head.weight"].device
        for i in range(config.text_config.num_hidden_layers):  # persistent buffer in LAVIS's modeling_llama.py
            sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(head_dim // 2, device=device)
    else:  # one module in LAVIS: shared == encoder.embed_tokens == decoder.embed_tokens (one tensor)
        sd["encoder.embed_tokens.weight"] = sd["decoder.embed_tokens.weight"] = sd["shared.weight"]
    return sd


def lavis_state_dict(config, seed: int = 0, meta: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    make = (lambda s: torch.empty(s, device="meta")) if meta else (lambda s: torch.randn(s, generator=gen) * 0.2)
    sd = {lavis: make(shape) for lavis, _, shape in lavis_layout(config)}
    dv = config.vision_config.hidden_size
    for i in range(config.vision_config.num_hidden_layers):
        sd[f"visual_encoder.blocks.{i}.attn.q_bias"] = make((dv,))
        sd[f"visual_encoder.blocks.{i}.attn.v_bias"] = make((dv,))
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(config.qformer_config.max_position_embeddings)[None]
    prefix = "llm_model." if config.use_decoder_only_language_model else "t5_model."
    sd.update({prefix + k: v for k, v in llm_state_dict(config, gen, meta).items()})
    return sd


def hand_mapped(config, lavis: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS -> transformers' InstructBLIP keys, by hand from the layout (the oracle's weights)."""
    out = {hf: lavis[src] for src, hf, _ in lavis_layout(config)}
    for i in range(config.vision_config.num_hidden_layers):
        q, v = lavis[f"visual_encoder.blocks.{i}.attn.q_bias"], lavis[f"visual_encoder.blocks.{i}.attn.v_bias"]
        out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    prefix = "llm_model." if config.use_decoder_only_language_model else "t5_model."
    for key, value in lavis.items():
        if key.startswith(prefix) and not key.endswith("inv_freq"):
            out["language_model." + key[len(prefix):]] = value
    return out


# --- fixtures ------------------------------------------------------------------------------------------------
def save_pth(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def run_cli(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module", params=KINDS)
def case(request, tmp_path_factory):
    """A tiny LAVIS checkpoint of one LLM kind, its conversion, and the hand-mapped oracle."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"conv_{kind}")
    config = InstructBlipConfig(**tiny.config_kwargs(kind))
    config.save_pretrained(tmp / "config")
    lavis = lavis_state_dict(config)
    checkpoint = save_pth({"model": lavis, "epoch": 3}, tmp / "full.pth")
    assert run_cli("--checkpoint", checkpoint, "--config", tmp / "config", "--output", tmp / "out",
                   "--max-shard-size", "20KB") == 0
    oracle_dir = tmp / "oracle"
    OracleConfig(**tiny.config_kwargs(kind)).save_pretrained(oracle_dir)
    save_file({k: v.clone().contiguous() for k, v in hand_mapped(config, lavis).items()},
              oracle_dir / "model.safetensors")
    inputs = model_inputs(config)
    with torch.no_grad():
        oracle_logits = OracleModel.from_pretrained(oracle_dir).eval()(**inputs).logits
    return dict(kind=kind, tmp=tmp, config=config, lavis=lavis, checkpoint=checkpoint, out=tmp / "out",
                inputs=inputs, oracle_logits=oracle_logits)


def model_inputs(config, batch: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    q_vocab, t_vocab = config.qformer_config.vocab_size, config.text_config.vocab_size - 1
    image = torch.full((batch, config.num_query_tokens), config.image_token_index)
    text = torch.randint(4, t_vocab, (batch, 6), generator=gen)
    inputs = dict(
        pixel_values=tiny.pixel_values(batch),
        qformer_input_ids=torch.randint(1, q_vocab, (batch, 5), generator=gen),
        qformer_attention_mask=torch.tensor([[1] * 5, [1] * 3 + [0] * 2])[:batch],
        input_ids=torch.cat([image, text], dim=1),
        attention_mask=torch.ones(batch, config.num_query_tokens + 6, dtype=torch.long),
    )
    if not config.use_decoder_only_language_model:
        inputs["decoder_input_ids"] = torch.randint(4, t_vocab, (batch, 4), generator=gen)
    return inputs


# --- parity and bit-exactness -----------------------------------------------------------------------------
def test_logits_match_transformers_instructblip(case):
    ours = InstructBlipForConditionalGeneration.from_pretrained(case["out"]).eval()
    with torch.no_grad():
        found = ours(**case["inputs"]).logits
    expected = case["oracle_logits"]
    assert expected.abs().max() > 1e-3  # the comparison carries signal
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)


def test_every_converted_tensor_equals_its_source(case):
    """Renamed tensors are the source bits; qkv.bias = cat(q_bias, 0, v_bias); position_ids/inv_freq dropped."""
    expected = hand_mapped(case["config"], case["lavis"])
    saved = {}
    for shard in sorted(case["out"].glob("model-*.safetensors")):
        saved.update(load_file(shard))
    assert len(list(case["out"].glob("model-*.safetensors"))) > 1  # --max-shard-size sharded the weights
    assert set(saved) <= set(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    reloaded = InstructBlipForConditionalGeneration.from_pretrained(case["out"]).state_dict()
    assert set(reloaded) == set(expected)
    assert [k for k in expected if not torch.equal(reloaded[k], expected[k])] == []


def test_mapping_accounts_for_every_source_key(case):
    config, lavis = case["config"], case["lavis"]
    result = convert_state_dict(lavis, TargetSpec.from_model(cli.empty_model(config)))
    consumed = [k for sources in result.sources.values() for k in sources]
    assert len(consumed) == len(set(consumed))  # each source key used once
    assert sorted(consumed + list(result.dropped)) == sorted(lavis)
    dropped = {k for k in lavis if k.endswith(("position_ids", "inv_freq"))}
    assert set(result.dropped) == dropped
    assert result.problems == {}


def test_trimmed_checkpoint_plus_vit_plus_llm_folder_equals_full(case):
    """The released pieces compose to the full state dict's conversion (EVA's extra 40th block and norm dropped)."""
    config, lavis, tmp = case["config"], case["lavis"], case["tmp"]
    trimmed = {k: v for k, v in lavis.items() if not k.startswith(("visual_encoder.", "t5_model.", "llm_model."))}
    vit = {k[len("visual_encoder."):]: v for k, v in lavis.items() if k.startswith("visual_encoder.")}
    depth = config.vision_config.num_hidden_layers
    extra_block = {k.replace("blocks.0.", f"blocks.{depth}.", 1): v
                   for k, v in vit.items() if k.startswith("blocks.0.")}
    vit.update(extra_block, **{"norm.weight": torch.ones(4), "norm.bias": torch.zeros(4)})
    prefix = f"{llm_prefix(config)}_model."
    # An HF LLM folder: config + safetensors, tied T5 embeddings stored once (the converter fills them back).
    tied_copies = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    llm_weights = {k[len(prefix):]: v.clone() for k, v in lavis.items()
                   if k.startswith(prefix) and "inv_freq" not in k and not k.endswith(tied_copies)}
    config.text_config.save_pretrained(tmp / "llm")
    save_file(llm_weights, tmp / "llm" / "model.safetensors")
    run = run_cli("--checkpoint", save_pth({"model": trimmed, "optimizer": {"state": {}}}, tmp / "trimmed.pth"),
                  "--vit", save_pth(vit, tmp / "vit.pth"), "--llm", tmp / "llm", "--config", tmp / "config",
                  "--output", tmp / "out_trimmed")
    assert run == 0
    full = InstructBlipForConditionalGeneration.from_pretrained(case["out"]).state_dict()
    composed = InstructBlipForConditionalGeneration.from_pretrained(tmp / "out_trimmed").state_dict()
    assert set(full) == set(composed)
    assert [k for k in full if not torch.equal(full[k], composed[k])] == []


def test_trimmed_checkpoint_alone_is_refused_with_a_hint(case, capsys):
    not_trimmed = ("visual_encoder.", "t5_model.", "llm_model.")
    trimmed = {k: v for k, v in case["lavis"].items() if not k.startswith(not_trimmed)}
    path = save_pth({"model": trimmed}, case["tmp"] / "trimmed_only.pth")
    assert run_cli("--checkpoint", path, "--config", case["tmp"] / "config", "--dry-run") == 1
    assert "pass --vit" in capsys.readouterr().err


def test_vocab_rows_the_source_lacks_are_appended_as_the_mean():
    """Vicuna from an HF folder lacks LAVIS's [PAD] row, and LAVIS lacks our <image> row: rows are appended."""
    config = InstructBlipConfig(**tiny.config_kwargs("llama"))
    lavis = lavis_state_dict(config)
    for key in ("llm_model.model.embed_tokens.weight", "llm_model.lm_head.weight"):
        lavis[key] = lavis[key][:-2]  # two rows short
    result = convert_state_dict(lavis, TargetSpec.from_model(cli.empty_model(config)))
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        source, out = lavis["llm_model." + key[len("language_model."):]], result.state_dict[key]
        assert out.shape[0] == config.text_config.vocab_size
        assert torch.equal(out[:-2], source)
        torch.testing.assert_close(out[-2:], source.mean(dim=0, keepdim=True).expand(2, -1))


def test_generation_config_holds_the_lavis_defaults(case):
    generation = json.loads((case["out"] / "generation_config.json").read_text())
    expected = dict(num_beams=5, max_new_tokens=256, min_new_tokens=1, repetition_penalty=1.5, length_penalty=1.0)
    assert {k: generation.get(k) for k in expected} == expected


def test_verify_checks_logits_against_a_reference(case, capsys):
    tmp, inputs, logits = case["tmp"], case["inputs"], case["oracle_logits"]
    good, bad = tmp / "reference.safetensors", tmp / "bad_reference.safetensors"
    save_file({**inputs, "logits": logits.contiguous()}, good)
    save_file({**inputs, "logits": (logits + 1e-3).contiguous()}, bad)
    assert run_cli("--checkpoint", case["checkpoint"], "--config", tmp / "config", "--verify",
                   "--output", tmp / "verified", "--reference", good) == 0
    assert "logits match the reference" in capsys.readouterr().out
    model = InstructBlipForConditionalGeneration.from_pretrained(tmp / "verified").eval()
    with pytest.raises(ConversionError, match="logits differ from the reference"):
        cli.check_reference_logits(model, bad, atol=1e-5)


# --- refusals --------------------------------------------------------------------------------------------
def corrupt_unexpected(sd):
    sd["Qformer.bert.pooler.dense.weight"] = torch.zeros(2, 2)
    return "Qformer.bert.pooler.dense.weight"


def corrupt_missing(sd):
    del sd["Qformer.bert.encoder.layer.1.output_query.dense.weight"]
    return "qformer.encoder.layer.1.output_query.dense.weight"


def corrupt_shape(sd):
    key = next(k for k in sd if k.endswith("_proj.weight") and not k.startswith(("llm_model", "t5_model")))
    sd[key] = sd[key][:-1].clone()  # one output row short
    return key


def corrupt_lone_q_bias(sd):
    del sd["visual_encoder.blocks.1.attn.v_bias"]
    return "visual_encoder.blocks.1.attn.v_bias"


@pytest.mark.parametrize("corrupt", [corrupt_unexpected, corrupt_missing, corrupt_shape, corrupt_lone_q_bias])
def test_bad_keys_stop_the_conversion_with_a_list(case, corrupt, capsys):
    lavis = dict(case["lavis"])
    named = corrupt(lavis)
    path = save_pth(lavis, case["tmp"] / f"{corrupt.__name__}.pth")
    out = case["tmp"] / f"out_{corrupt.__name__}"
    assert run_cli("--checkpoint", path, "--config", case["tmp"] / "config", "--output", out) == 1
    assert named in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ConversionError, match=named.replace(".", r"\.")):
        convert_state_dict(lavis, TargetSpec.from_model(cli.empty_model(case["config"])))


def test_dry_run_prints_the_accounting_and_writes_nothing(case, tmp_path, capsys):
    """Llama: run as documented (a subprocess) so the script's own imports are exercised; T5: in process."""
    argv = ["--checkpoint", str(case["checkpoint"]), "--config", str(case["tmp"] / "config"), "--dry-run",
            "--output", str(tmp_path / "x")]
    if case["kind"] == "llama":
        script = str(ROOT / "conversion" / "convert_lavis_checkpoint.py")
        proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
        assert proc.returncode == 0, proc.stderr
        printed = proc.stdout
    else:
        assert run_cli(*argv) == 0
        printed = capsys.readouterr().out
    assert "position ids" in printed and "PROBLEM" not in printed
    assert ("rotary frequencies" in printed) == case["config"].use_decoder_only_language_model
    assert not (tmp_path / "x").exists()


def test_truncated_file_is_refused(case, capsys):
    data = case["checkpoint"].read_bytes()
    path = case["tmp"] / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    assert run_cli("--checkpoint", path, "--config", case["tmp"] / "config", "--dry-run") == 1
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "truncated or corrupt" in err


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", b"\x80\x02" + bytes(range(3, 64))],
                         ids=["empty", "text", "broken-pickle"])
def test_unreadable_pth_is_named(tmp_path, content):
    """Once an IndexError (empty), a KeyError (text) or a misleading 'references code' (broken pickle)."""
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^--vit: {re.escape(str(path))} is not a readable PyTorch checkpoint"):
        load_state_dict_file(path, "--vit")


def test_a_folder_holding_weights_is_refused_unless_overwrite(case, tmp_path, capsys):
    """New shards beside an old model.safetensors would load the old file; --overwrite deletes only weights."""
    out = tmp_path / "out"
    out.mkdir()
    save_file({"old": torch.zeros(1)}, out / "model.safetensors")
    (out / "notes.txt").write_text("mine")
    argv = ["--checkpoint", case["checkpoint"], "--config", case["tmp"] / "config", "--output", out,
            "--max-shard-size", "20KB"]
    assert run_cli(*argv) == 1
    assert re.search(r"--output: expected a folder without model weights, found \['model.safetensors'\].*--overwrite",
                     capsys.readouterr().err)
    assert set(load_file(out / "model.safetensors")) == {"old"}
    assert run_cli(*argv, "--overwrite") == 0
    assert not (out / "model.safetensors").exists() and (out / "notes.txt").read_text() == "mine"
    expected = InstructBlipForConditionalGeneration.from_pretrained(case["out"]).state_dict()
    found = InstructBlipForConditionalGeneration.from_pretrained(out).state_dict()
    assert [k for k in expected if not torch.equal(found[k], expected[k])] == []


@pytest.mark.parametrize("problem", ["output-is-a-file", "output-holds-weights", "missing-config"])
def test_paths_are_checked_before_any_weights_are_read(tmp_path, capsys, problem):
    """The checkpoint does not exist: had it been read first, the error would name --checkpoint."""
    out, config = tmp_path / "out", ["--flavour", "flant5xl"]
    if problem == "output-is-a-file":
        out.write_text("mine")
        expected = f"--output: expected a folder, found a file at {out}"
    elif problem == "output-holds-weights":
        out.mkdir()
        (out / "pytorch_model.bin").write_bytes(b"old")
        expected = "--output: expected a folder without model weights, found ['pytorch_model.bin']"
    else:
        config = ["--config", str(tmp_path / "missing")]
        expected = f"--config: expected a config.json file or a folder holding one, found nothing at {tmp_path}"
    before = snapshot(tmp_path)
    assert run_cli("--checkpoint", tmp_path / "missing.pth", *config, "--output", out) == 1
    assert expected in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def snapshot(folder: Path) -> dict[Path, bytes | None]:
    """Every path under `folder` with its bytes (None for folders)."""
    return {path: path.read_bytes() if path.is_file() else None for path in folder.rglob("*")}


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_carries_code_is_refused_and_not_run(case, capsys):
    marker = case["tmp"] / "code_ran"
    path = save_pth({"model": {"query_tokens": torch.zeros(1)}, "payload": _RunsCode(str(marker))},
                    case["tmp"] / "evil.pth")
    assert run_cli("--checkpoint", path, "--config", case["tmp"] / "config", "--dry-run") == 1
    err = capsys.readouterr().err
    assert "refusing to load" in err and "weights_only" in err
    assert not marker.exists()


def test_plain_pickle_that_carries_code_is_refused_as_such(tmp_path):
    """`pickle.dump` (not `torch.save`): torch refuses its framing before reading the code reference."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "legacy.pth"
    with path.open("wb") as file:
        pickle.dump({"model": {"query_tokens": torch.zeros(1)}, "payload": _RunsCode(str(marker))}, file)
    with pytest.raises(ValueError, match=rf"^--checkpoint: refusing to load {re.escape(str(path))}: .*references "
                                         r"code.*could run that code"):
        load_state_dict_file(path, "--checkpoint")
    assert not marker.exists()


# --- flavour presets reproduce the released LAVIS shapes ---------------------------------------------------
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_flavour_preset_accepts_the_released_lavis_layout(flavour):
    """A meta-device LAVIS state dict with the documented shapes converts cleanly under each preset."""
    config = InstructBlipConfig(**model_config_kwargs(flavour, text_config_for(flavour)))
    lavis = lavis_state_dict(config, meta=True)
    # the documented released shapes (reference/lavis_checkpoint_layout.md)
    assert lavis["visual_encoder.blocks.38.attn.qkv.weight"].shape == (4224, 1408)
    assert lavis["visual_encoder.blocks.0.mlp.fc1.weight"].shape == (6144, 1408)
    assert lavis["Qformer.bert.embeddings.word_embeddings.weight"].shape == (30523, 768)
    assert lavis["Qformer.bert.encoder.layer.10.crossattention.self.key.weight"].shape == (768, 1408)
    assert lavis["query_tokens"].shape == (1, 32, 768)
    llm_width = {"flant5xl": 2048, "flant5xxl": 4096, "vicuna7b": 4096, "vicuna13b": 5120}[flavour]
    assert lavis[f"{llm_prefix(config)}_proj.weight"].shape == (llm_width, 768)
    if flavour.startswith("vicuna"):  # LAVIS's LLaMA holds [PAD]: 32001 rows; the target adds <image>
        for key in ("llm_model.model.embed_tokens.weight", "llm_model.lm_head.weight"):
            lavis[key] = torch.empty(32001, llm_width, device="meta")
    result = convert_state_dict(lavis, TargetSpec.from_model(cli.empty_model(config)))
    assert result.problems == {}
    if flavour.startswith("vicuna"):
        assert result.state_dict["language_model.model.embed_tokens.weight"].shape == (32002, llm_width)


# --- processor ----------------------------------------------------------------------------------------------
def test_processor_is_written_when_tokenizers_are_given(tmp_path):
    from hf_instructblip.model.processing import InstructBlipProcessor

    qformer_tok, llm_tok = tiny.qformer_tokenizer(), tiny.llm_tokenizer("llama")
    qformer_tok.save_pretrained(tmp_path / "qtok")
    llm_tok.save_pretrained(tmp_path / "ltok")
    # the processor appends "<image>" to the LLM vocabulary: the config must place the image token there
    config = InstructBlipConfig(**tiny.config_kwargs("llama", image_token_index=len(llm_tok)))
    config.save_pretrained(tmp_path / "config")
    checkpoint = save_pth(lavis_state_dict(config), tmp_path / "full.pth")
    assert run_cli("--checkpoint", checkpoint, "--config", tmp_path / "config", "--output", tmp_path / "out",
                   "--qformer-tokenizer", tmp_path / "qtok", "--llm-tokenizer", tmp_path / "ltok") == 0
    processor = InstructBlipProcessor.from_pretrained(tmp_path / "out")
    model = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert processor.image_token_id == model.config.image_token_index
    assert processor.qformer_tokenizer.truncation_side == "left"
    inputs = processor(images=tiny.images(1), text="what is in the picture ?", return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == config.vision_config.image_size
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_processor_with_a_mismatched_image_token_is_refused(case, tmp_path, capsys):
    tiny.qformer_tokenizer().save_pretrained(tmp_path / "qtok")
    tiny.llm_tokenizer("llama").save_pretrained(tmp_path / "ltok")  # "<image>" would get id 300, config says 319
    assert run_cli("--checkpoint", case["checkpoint"], "--config", case["tmp"] / "config", "--output",
                   tmp_path / "out", "--qformer-tokenizer", tmp_path / "qtok",
                   "--llm-tokenizer", tmp_path / "ltok") == 1
    assert "config.image_token_index is 319" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def progress_bars():
    """Progress bars on for the test, the global switch restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield hf_logging
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()


def test_weights_are_read_under_progress_bars_that_change_nothing(tmp_path, capsys, progress_bars):
    from hf_instructblip.conversion.checkpoint_io import load_llm

    folder = tmp_path / "llm"
    tiny.text_config("llama").save_pretrained(folder)
    shards = [{"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(2, dtype=torch.bfloat16)},
              {"c.bias": torch.tensor([1, 2], dtype=torch.int64)}]
    for i, shard in enumerate(shards, start=1):
        save_file(shard, folder / f"model-0000{i}-of-00002.safetensors")
    expected = load_file(folder / "model-00001-of-00002.safetensors")

    loaded = load_state_dict_file(folder / "model-00001-of-00002.safetensors", "--vit")
    assert "reading model-00001-of-00002.safetensors" in capsys.readouterr().err
    state_dict, _ = load_llm(str(folder))
    assert "reading llm" in capsys.readouterr().err  # the per-file bar of an LLM folder
    progress_bars.disable_progress_bar()
    quiet = load_state_dict_file(folder / "model-00001-of-00002.safetensors", "--vit")
    assert capsys.readouterr().err == ""
    for result in (loaded, quiet):
        assert list(result) == list(expected)  # same keys in the same order
        assert all(result[k].dtype == expected[k].dtype and torch.equal(result[k], expected[k]) for k in expected)
    assert sorted(state_dict) == ["a.weight", "b.weight", "c.bias"] and torch.equal(state_dict["c.bias"],
                                                                                    shards[1]["c.bias"])
