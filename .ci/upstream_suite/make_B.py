"""Generate tf/tests/models/instructblip_ours/: copies of transformers' two InstructBLIP test files whose InstructBLIP
classes (configs, models, processor) come from `hf_instructblip` instead of `transformers`. Nothing else changes:
CONFIG_MAPPING["opt"] (the text config), BitsAndBytesConfig and PreTrainedModel stay transformers'."""

import pathlib
import py_compile

SRC = pathlib.Path(__file__).parent / "tf/tests/models/instructblip"
DST = SRC.parent / "instructblip_ours"
DST.mkdir(exist_ok=True)
(DST / "__init__.py").write_text("")

REPLACEMENTS = {
    "test_modeling_instructblip.py": [
        (
            "from transformers import (\n    CONFIG_MAPPING,\n    BitsAndBytesConfig,\n    InstructBlipConfig,\n"
            "    InstructBlipProcessor,\n    InstructBlipQFormerConfig,\n    InstructBlipVisionConfig,\n"
            "    PreTrainedModel,\n)\n",
            "from transformers import (\n    CONFIG_MAPPING,\n    BitsAndBytesConfig,\n    PreTrainedModel,\n)\n"
            "from hf_instructblip import (  # (B): ours instead of transformers'\n    InstructBlipConfig,\n"
            "    InstructBlipProcessor,\n    InstructBlipQFormerConfig,\n    InstructBlipVisionConfig,\n)\n",
        ),
        (
            "    from transformers import InstructBlipForConditionalGeneration, InstructBlipModel, InstructBlipVisionModel\n",
            "    from hf_instructblip import (  # (B): ours\n"
            "        InstructBlipForConditionalGeneration,\n        InstructBlipModel,\n        InstructBlipVisionModel,\n    )\n",
        ),
    ],
    "test_processing_instructblip.py": [
        (
            "    from transformers import (\n        InstructBlipProcessor,\n    )\n",
            "    from hf_instructblip import InstructBlipProcessor  # (B): ours instead of transformers'\n",
        ),
    ],
}

for name, reps in REPLACEMENTS.items():
    text = (SRC / name).read_text()
    for old, new in reps:
        assert text.count(old) == 1, (name, old)
        text = text.replace(old, new)
    assert "from transformers import Instruct" not in text and "transformers.models.instructblip" not in text
    (DST / name).write_text(text)
    py_compile.compile(str(DST / name), doraise=True)
    print("wrote", DST / name)
