"""Which official file(s) and split each converter reads, what --images points to, and where they come from.

The one home of this table: `--list` prints it and the README mirrors it. "checked" says what the field names were
checked against (a published schema or loader, or only inferred).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class DatasetSource:
    """What one held-out dataset's converter expects. `extra` maps a CLI option to the file it takes."""

    split: str
    annotations: str
    images: str
    source: str
    checked: str
    extra: Mapping[str, str] = field(default_factory=dict)


SOURCES: Mapping[str, DatasetSource] = MappingProxyType({
    "nocaps": DatasetSource(
        "val (4,500 images)", "nocaps_val_4500_captions.json", "the val images folder (file_name inside)",
        "https://nocaps.org/download (LAVIS: lavis/configs/datasets/nocaps/defaults.yaml, split val)",
        "inferred from the COCO caption format nocaps uses (images/annotations); not checked against a real file"),
    "flickr30k": DatasetSource(
        "Karpathy test (1,000 images)", "dataset_flickr30k.json (Karpathy's caption_datasets.zip)",
        "flickr30k-images/",
        "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
        "inferred from the Karpathy split format (images[].filename/split/sentences[].raw); not checked"),
    "gqa": DatasetSource(
        "test-dev balanced (12,578 questions)", "testdev_balanced_questions.json (questions1.2.zip)",
        "images/ (<imageId>.jpg)",
        "https://cs.stanford.edu/people/dorarad/gqa/download.html (LAVIS: gqa/balanced_testdev.yaml uses this "
        "file as its eval split)",
        "GQA question schema (imageId, question, answer); split from LAVIS's config"),
    "vsr": DatasetSource(
        "zero-shot split, test", "splits/zeroshot/test.jsonl", "the folder of COCO 2017 images",
        "https://github.com/cambridgeltl/visual-spatial-reasoning",
        "fields image/caption/label as LAVIS's vsr_datasets.py reads them"),
    "iconqa": DatasetSource(
        "test, multi-text-choice 'choose_txt' (6,316 questions)", "problems.json (iconqa_data.zip)",
        "iconqa_data/iconqa/ (test/choose_txt/<pid>/image.png)",
        "https://github.com/lupantech/IconQA",
        "problems.json fields (question, choices, answer index, ques_type, split) and image layout as public "
        "loaders read them"),
    "textvqa": DatasetSource(
        "val (5,000 questions)", "TextVQA_0.5.1_val.json", "train_images/ (<image_id>.jpg; val images are there)",
        "https://textvqa.org/dataset",
        "TextVQA 0.5.1 fields (data[].question_id/image_id/question/answers) and Rosetta OCR file as public "
        "loaders read them",
        {"--ocr": "TextVQA_Rosetta_OCR_v0.2_val.json (OCR tokens per image_id)"}),
    "visdial": DatasetSource(
        "val v1.0 (2,064 dialogs x 10 rounds)", "visdial_1.0_val.json", "VisualDialog_val2018/",
        "https://visualdialog.org/data (LAVIS: visdial/defaults_dial.yaml, split val)",
        "VisDial 1.0 schema (data.questions/answers/dialogs[].dialog[].answer_options/gt_index) and image names as "
        "LAVIS's visdial_dialogue_datasets.py reads them"),
    "hateful_memes": DatasetSource(
        "dev seen (500 memes)", "dev_seen.jsonl", "the folder holding img/",
        "https://hatefulmemeschallenge.com (Phase 2 release)",
        "inferred from the published line format (id, img, label, text); not checked"),
    "vizwiz": DatasetSource(
        "val (4,319 questions); the paper reports test-dev, which has no public answers",
        "Annotations/val.json", "val/ (VizWiz_val_*.jpg)",
        "https://vizwiz.org/tasks-and-datasets/vqa/ (LAVIS: vizwiz/defaults.yaml, splits val and test)",
        "fields image/question/answers[].answer as LAVIS's vizwiz_vqa_datasets.py reads them"),
    "scienceqa": DatasetSource(
        "test, questions with an image (2,017)", "problems.json", "images/ (test/<pid>/image.png)",
        "https://github.com/lupantech/ScienceQA (data/scienceqa)",
        "inferred from the published problems.json fields (question, choices, answer, hint, image, split); "
        "not checked"),
    "msvd_qa": DatasetSource(
        "test (13,157 questions)", "test_qa.json (or LAVIS's qa_test.json)", "a folder of frame folders, one per clip",
        "https://github.com/xudejing/video-question-answering (LAVIS: msvd/defaults_qa.yaml)",
        "LAVIS's format from video_vqa_datasets.py; the original release's fields inferred",
        {"--answer-list": "train_ans2label.json (LAVIS) or a JSON list: the ranked vocabulary",
         "--mapping": "youtube_mapping.txt (optional: frame folders named by clip)"}),
    "msrvtt_qa": DatasetSource(
        "test (72,821 questions)", "test_qa.json (or LAVIS's qa_test.json)", "a folder of frame folders, one per video",
        "https://github.com/xudejing/video-question-answering (LAVIS: msrvtt/defaults_qa.yaml)",
        "LAVIS's format from video_vqa_datasets.py; the original release's fields inferred",
        {"--answer-list": "train_ans2label.json (LAVIS) or a JSON list: the ranked vocabulary"}),
    "ivqa": DatasetSource(
        "test (2,000 questions)", "test.csv", "a folder of frame folders, one per clip",
        "https://github.com/antoyang/just-ask (iVQA)",
        "inferred (columns video_id, start, end, question, answer1..answer5); not checked against a real file"),
})
