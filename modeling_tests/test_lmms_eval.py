"""lmms-eval plugin: found by lmms-eval's own entry-point discovery under `hf_instructblip`, batched `generate_until`
equal to one-by-one and to our `generate` + post-processing (llama and T5), no prompt echo, `until` honoured,
`loglikelihood` equal to log-probs taken from the model's logits, `is_greedy` both ways, bad input named, and a
tiny local task end to end through `lmms_eval.evaluator.simple_evaluate`."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

import tiny  # noqa: E402
import torch  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models import get_model, list_available_models  # noqa: E402

from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration, rank_candidates  # noqa: E402
from hf_instructblip.evaluate.lmms_eval_model import (  # noqa: E402
    InstructBlipLmms,
    cut_at_stop_strings,
    generation_settings,
    side_by_side,
)

TASK, SPLIT = "tiny_task", "test"
CONTEXTS = ["what is in the picture ?", "<image>\nhow many shapes are there ?", "describe the image briefly .",
            "question : what shape is shown ? answer :", "what colour is the circle ?"]
CONTINUATIONS = [" a red circle", " two shapes", "a blue square", " a square .", " red"]


def doc_to_visual(doc: dict) -> list:
    return [doc["image"]]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [{"image": image, "question": question} for image, question in zip(tiny.images(len(CONTEXTS)), CONTEXTS)]


def build_checkpoint(kind: str, folder: Path):
    processor = tiny.processor(kind)
    torch.manual_seed(0)
    config = InstructBlipConfig(**tiny.config_kwargs(kind, image_token_index=processor.image_token_id))
    model = tiny.randomize_(InstructBlipForConditionalGeneration(config)).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


@pytest.fixture(scope="module", params=["llama", "t5"])
def setup(request, tmp_path_factory, docs):
    """(our model in memory, its processor, the plugin built by lmms-eval from the saved folder, batch size 3)."""
    folder = tmp_path_factory.mktemp(request.param)
    model, processor = build_checkpoint(request.param, folder)
    lm = get_model("hf_instructblip").create_from_arg_string(f"pretrained={folder},device=cpu,dtype=float32",
                                                            {"batch_size": 3})
    lm.task_dict = {TASK: {SPLIT: docs}}
    return model, processor, lm


def instance(kind: str, doc_id: int, second, context: str | None = None) -> Instance:
    """A request as lmms-eval's ConfigurableTask builds it: (context, gen_kwargs | continuation, doc_to_visual,
    doc_id, task, split)."""
    args = (CONTEXTS[doc_id] if context is None else context, second, doc_to_visual, doc_id, TASK, SPLIT)
    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def run(lm, method: str, requests: list[Instance], batch_size: int) -> list:
    lm.batch_size_per_gpu = batch_size
    try:
        return getattr(lm, method)(requests)
    finally:
        lm.batch_size_per_gpu = 3


# --- generate_until ---------------------------------------------------------------------------------------------
def reference_answer(model, processor, image, context: str, until: list[str], **generate_kwargs) -> str:
    """Our own `generate` on the unpadded example, the prompt echo removed by the processor, cut at `until`."""
    prompt = context.replace("<image>", "").lstrip()
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    ids = model.generate(**inputs, **generate_kwargs)
    echoed = inputs["input_ids"] if model.config.use_decoder_only_language_model else None
    text = processor.post_process_generation(ids, echoed)[0]
    cuts = [text.find(stop) for stop in until if stop in text]
    return text[: min(cuts)].strip() if cuts else text


def test_found_through_lmms_eval_entry_points():
    assert "hf_instructblip" in list_available_models()
    assert get_model("hf_instructblip") is InstructBlipLmms


def test_generate_until_batched_equals_one_by_one_equals_generate(setup, docs):
    model, processor, lm = setup
    full = [reference_answer(model, processor, d["image"], c, [], do_sample=False, num_beams=1, max_new_tokens=6)
            for d, c in zip(docs, CONTEXTS)]
    source = next(text for text in full if len(text.strip()) >= 4)  # a stop string the model really writes
    stop = source.strip()[2:4]
    cases = [
        (dict(until=[stop, "zzz"], max_new_tokens=6, temperature=0, top_p=None, num_beams=1, do_sample=False),
         dict(do_sample=False, num_beams=1, max_new_tokens=6), [stop]),
        (dict(max_new_tokens=4, num_beams=2), dict(do_sample=False, num_beams=2, max_new_tokens=4), []),
    ]
    for gen_kwargs, generate_kwargs, until in cases:
        expected = [reference_answer(model, processor, d["image"], c, until, **generate_kwargs)
                    for d, c in zip(docs, CONTEXTS)]
        requests = [instance("generate_until", i, dict(gen_kwargs)) for i in range(len(docs))]
        batched = run(lm, "generate_until", requests, batch_size=3)
        assert batched == run(lm, "generate_until", requests, batch_size=1) == expected
        for answer, context in zip(batched, CONTEXTS):  # no prompt echo; nothing from a stop string on
            assert not answer.startswith(context.replace("<image>", "").strip())
            assert not any(s in answer for s in until)
    assert stop in source


def test_generate_until_groups_settings_and_keeps_order(setup, docs):
    model, processor, lm = setup
    short, longer = dict(max_new_tokens=2), dict(max_new_tokens=5)
    requests = [instance("generate_until", i, dict(short if i % 2 else longer)) for i in range(len(docs))]
    expected = [reference_answer(model, processor, d["image"], c, [], do_sample=False, num_beams=1,
                                 max_new_tokens=(short if i % 2 else longer)["max_new_tokens"])
                for i, (d, c) in enumerate(zip(docs, CONTEXTS))]
    assert run(lm, "generate_until", requests, batch_size=2) == expected


def test_unset_settings_come_from_the_chosen_defaults(setup, docs):
    model, processor, lm = setup
    requests = [instance("generate_until", i, {}) for i in range(2)]  # the task sets nothing
    checkpoint = lm.model.generation_config
    saved = (lm.max_new_tokens, checkpoint.num_beams, checkpoint.max_new_tokens)
    lm.max_new_tokens, checkpoint.num_beams, checkpoint.max_new_tokens = 3, 2, 2
    try:
        harness = run(lm, "generate_until", requests, 2)  # greedy, one beam, the plugin's max_new_tokens
        lm.generation_defaults = "checkpoint"  # the checkpoint's beams and length
        from_checkpoint = run(lm, "generate_until", requests, 2)
    finally:
        lm.generation_defaults = "lmms_eval"
        lm.max_new_tokens, checkpoint.num_beams, checkpoint.max_new_tokens = saved
    for settings, answers in ((dict(num_beams=1, max_new_tokens=3), harness),
                              (dict(num_beams=2, max_new_tokens=2), from_checkpoint)):
        assert answers == [reference_answer(model, processor, docs[i]["image"], CONTEXTS[i], [], do_sample=False,
                                            **settings) for i in range(2)]


# --- loglikelihood ----------------------------------------------------------------------------------------------
def reference_loglikelihood(model, processor, image, context: str, continuation: str) -> tuple[float, bool, int]:
    """Sum of log_softmax(model logits) over the continuation's tokens, whether each is the argmax, token count."""
    tokenizer = processor.tokenizer
    context = context.replace("<image>", "").lstrip()
    prompt = context.rstrip()  # trailing whitespace belongs to the continuation's first token
    continuation = context[len(prompt):] + continuation
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    if model.config.use_decoder_only_language_model:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target = torch.tensor(tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"][len(prompt_ids):])
        ids = torch.cat([inputs["input_ids"][0], target]).unsqueeze(0)
        logits = model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits[0]
        start = inputs["input_ids"].shape[1] - 1
        logits = logits[start : start + len(target)]  # position t predicts token t + 1
    else:
        target = torch.tensor(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        logits = model(**inputs, labels=target.unsqueeze(0)).logits[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    total = log_probs[torch.arange(len(target)), target].sum().item()
    return total, bool((logits.argmax(-1) == target).all()), len(target)


@torch.no_grad()
def test_loglikelihood_equals_log_probs_from_logits(setup, docs):
    model, processor, lm = setup
    requests = [instance("loglikelihood", i, cont) for i, cont in enumerate(CONTINUATIONS)]
    # lmms-eval's `loglikelihood` output type passes the task's doc_to_target function instead of a string.
    requests.append(instance("loglikelihood", 2, lambda doc: doc["question"].split()[0], context="answer: "))
    expected = [reference_loglikelihood(model, processor, docs[i]["image"], CONTEXTS[i], cont)
                for i, cont in enumerate(CONTINUATIONS)]
    expected.append(reference_loglikelihood(model, processor, docs[2]["image"], "answer: ", "describe"))
    greedy = [g for _, g, _ in expected]
    log_likelihoods = torch.tensor([total for total, _, _ in expected])
    losses = torch.tensor([-total / n for total, _, n in expected])  # mean NLL per token: lmms-eval's convention
    assert (log_likelihoods < 0).all() and any(n > 1 for _, _, n in expected)
    assert lm.loglikelihood_score == "loss"
    for score, batch_size, reference in (("loss", 3, losses), ("logprob", 3, log_likelihoods),
                                         ("logprob", 1, log_likelihoods)):
        lm.loglikelihood_score = score
        try:
            results = run(lm, "loglikelihood", requests, batch_size)
        finally:
            lm.loglikelihood_score = "loss"
        assert [g for _, g in results] == greedy
        torch.testing.assert_close(torch.tensor([value for value, _ in results]), reference, rtol=1e-5, atol=1e-4)


def test_multiple_choice_requests_score_as_rank_candidates(setup, docs):
    """A multiple-choice question's requests (one document and context, several continuations) score as the
    candidates of one example of `rank_candidates`, the image and context run once: the same values (1e-5), the same
    greedy flags, in request order, with other documents' requests interleaved."""
    model, processor, lm = setup
    tokenizer = processor.tokenizer
    choices = [" a red circle", " two shapes", " a square .", " red"]
    order = [(3, choices[0]), (0, " blue"), (3, choices[1]), (3, choices[2]), (0, " red"), (3, choices[3])]
    requests = [instance("loglikelihood", doc, cont) for doc, cont in order]
    lm.loglikelihood_score = "logprob"
    try:
        results = run(lm, "loglikelihood", requests, 2)
    finally:
        lm.loglikelihood_score = "loss"

    def candidate_ids(context: str, continuation: str) -> list[int]:
        if not model.config.use_decoder_only_language_model:
            return tokenizer(continuation, add_special_tokens=False)["input_ids"]
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        return tokenizer(context + continuation, add_special_tokens=False)["input_ids"][len(context_ids):]

    for doc in (3, 0):
        context = CONTEXTS[doc]
        asked = [i for i, (d, _) in enumerate(order) if d == doc]
        inputs = processor(images=docs[doc]["image"], text=context, return_tensors="pt")
        ranked = rank_candidates(model, **inputs, candidates=[[candidate_ids(context, order[i][1]) for i in asked]])
        torch.testing.assert_close(torch.tensor([results[i][0] for i in asked]), ranked.scores[0], rtol=1e-5,
                                   atol=1e-5)
        assert [results[i][1] for i in asked] == ranked.greedy[0].tolist()


@torch.no_grad()
def test_is_greedy_true_and_false(setup, docs):
    model, processor, lm = setup
    tokenizer = processor.tokenizer
    continuation = " a"
    (token,) = tokenizer(continuation, add_special_tokens=False)["input_ids"]  # one token: forceable by a bias
    request = instance("loglikelihood", 2, continuation)
    free = reference_loglikelihood(model, processor, docs[2]["image"], CONTEXTS[2], continuation)
    assert free[1] is False  # the random model does not pick it
    assert run(lm, "loglikelihood", [request], 1)[0][1] is False

    def favour(module, inputs, output):  # every position's argmax becomes `token`
        output[..., token] += 1000.0
        return output

    hooks = [m.language_model.get_output_embeddings().register_forward_hook(favour) for m in (model, lm.model)]
    try:
        forced = reference_loglikelihood(model, processor, docs[2]["image"], CONTEXTS[2], continuation)
        (score, greedy), = run(lm, "loglikelihood", [request], 1)
    finally:
        for hook in hooks:
            hook.remove()
    assert forced[1] is True and greedy is True
    assert score == pytest.approx(-forced[0], abs=1e-4) and score == pytest.approx(0.0, abs=1e-3)


# --- what is refused, by name -----------------------------------------------------------------------------------
def test_unsupported_requests_are_named(setup, docs):
    _, _, lm = setup
    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        lm.generate_until_multi_round([])
    unconditional = Instance(request_type="loglikelihood", arguments=("", " red"), idx=0,
                             metadata={"task": TASK, "doc_id": 0, "repeats": 1})
    with pytest.raises(ValueError, match="must hold 6 arguments.*found 2"):
        lm.loglikelihood([unconditional])
    lm.task_dict["text_only"] = {SPLIT: [{"image": None}]}
    text_only = Instance(request_type="generate_until", arguments=("hi", {}, lambda doc: [], 0, "text_only", SPLIT),
                         idx=0, metadata={"task": "text_only", "doc_id": 0, "repeats": 1})
    with pytest.raises(ValueError, match="doc 0 of task 'text_only' has no image"):
        lm.generate_until([text_only])
    two = Instance(request_type="generate_until", idx=0, metadata={"task": TASK, "doc_id": 0, "repeats": 1},
                   arguments=("hi", {"max_new_tokens": 1}, lambda doc: [doc["image"], doc["image"]], 0, TASK, SPLIT))
    lm.multiple_images = "error"
    try:
        with pytest.raises(ValueError, match="has 2 images.*multiple_images=concat"):
            lm.generate_until([two])
    finally:
        lm.multiple_images = "concat"
    with pytest.warns(UserWarning, match="side by side"):
        assert len(lm.generate_until([two])) == 1


@pytest.mark.parametrize("args, message", [
    ("device=cpu", "`pretrained` is required"),
    ("pretrained=x,batch_size=auto", "`batch_size` must be an int >= 1 \\('auto'"),
    ("pretrained=x,dtype=float33", "`dtype` must be 'auto' or a torch dtype name"),
    ("pretrained=x,generation_defaults=lavis", "`generation_defaults` must be one of"),
    ("pretrained=x,multiple_images=grid", "`multiple_images` must be one of"),
    ("pretrained=x,loglikelihood_score=nll", "`loglikelihood_score` must be one of"),
])
def test_bad_model_args_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        InstructBlipLmms.create_from_arg_string(args)


def test_generation_settings_read_as_lmms_eval_models_do():
    assert generation_settings({"until": "\n", "temperature": 0, "top_p": 0.9, "do_sample": True}) == (
        {"do_sample": False}, ["\n"])
    assert generation_settings({"temperature": 0.7, "top_p": None, "num_beams": 1}) == (
        {"temperature": 0.7, "num_beams": 1, "do_sample": True}, [])
    assert generation_settings({"temperature": 0.7, "do_sample": False}) == ({"do_sample": False}, [])
    warned = []
    assert generation_settings({"image_aspect_ratio": "pad", "max_new_tokens": 3, "until": ["", "\n\n"]},
                               warn=lambda key, message: warned.append(message)) == ({"max_new_tokens": 3}, ["\n\n"])
    assert "image_aspect_ratio" in warned[0]
    with pytest.raises(TypeError, match="`until` in generation_kwargs must be a string or a list of strings"):
        generation_settings({"until": 3})
    assert cut_at_stop_strings(" a dog.\nQuestion: b", ["Question:", "\n"]) == "a dog."
    image = side_by_side(tiny.images(2, size=10) + [tiny.images(1, size=20)[0]])
    assert image.size == (60, 20) and image.mode == "RGB"


# --- end to end through lmms-eval's evaluator -------------------------------------------------------------------
TASK_UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
'''


def test_simple_evaluate_runs_a_local_task(tmp_path, docs, monkeypatch):
    """A generate_until task and a multiple-choice (loglikelihood) task on local files: the harness's evaluator
    end to end (task loading, request building, our model, metrics), offline."""
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    if importlib.util.find_spec("filelock._api") is None:
        # filelock >= 4: lmms-eval 0.7.3 patches this module (nested dataset loads), so it would fail here; the
        # real CLI needs `filelock<4` (see the README), the test only the rest of the evaluator.
        monkeypatch.setattr(evaluator, "_enable_reentrant_filelocks", lambda: None)
    # lmms-eval >= 0.7 passes every response through `unwrap_generation_output`, which turns a loglikelihood
    # `(float, bool)` into its string, so `multiple_choice` scoring fails for every model (upstream bug). Pass such
    # pairs through unchanged, as the scoring expects them.
    unwrap = evaluator.unwrap_generation_output

    def keep_pairs(output):
        return (output, None) if isinstance(output, tuple) and isinstance(output[-1], bool) else unwrap(output)

    monkeypatch.setattr(evaluator, "unwrap_generation_output", keep_pairs)

    folder = tmp_path / "model"
    build_checkpoint("llama", folder)
    rows = []
    for i, doc in enumerate(docs[:3]):
        doc["image"].save(tmp_path / f"{i}.png")
        rows.append({"image": str(tmp_path / f"{i}.png"), "question": doc["question"], "answer": "two",
                     "choices": ["two", "red"], "label": 0})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(TASK_UTILS)
    common = f"""
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / "data.jsonl"}
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
    """
    (tasks / "tiny_generate.yaml").write_text(textwrap.dedent("""
        task: tiny_generate
        output_type: generate_until
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 3
          until: ["\\n"]
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
    """) + textwrap.dedent(common))
    (tasks / "tiny_choice.yaml").write_text(textwrap.dedent("""
        task: tiny_choice
        output_type: multiple_choice
        doc_to_choice: choices
        doc_to_target: label
        metric_list:
          - metric: acc
    """) + textwrap.dedent(common))
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    results = evaluator.simple_evaluate(
        model="hf_instructblip", model_args=f"pretrained={folder},device=cpu,dtype=float32",
        tasks=["tiny_generate", "tiny_choice"], batch_size=2, task_manager=manager, log_samples=True,
        bootstrap_iters=0)
    assert results["results"]["tiny_generate"]["exact_match,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert results["results"]["tiny_choice"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    generated = results["samples"]["tiny_generate"]
    assert len(generated) == 3 and all(isinstance(s["resps"][0][0], str) for s in generated)
    # Each choice's (loss, is_greedy): positive losses, of which lmms-eval picks the smallest.
    choice = results["samples"]["tiny_choice"]
    assert len(choice) == 3 and all(len(s["resps"]) == 2 for s in choice)
    assert all(r[0][0] > 0 and isinstance(r[0][1], bool) for s in choice for r in s["resps"])
