"""LAVIS's own stage-1 code (`Blip2Qformer.forward`, its BERT Q-Former, gathers) read from the `salesforce-lavis`
1.0.2 wheel at test time, with stubs only for what stage 1 never runs (registry, EVA / CLIP builders, download and
config helpers). Nothing of LAVIS is copied into the repository.

The wheel is looked for in `$LAVIS_WHEEL` (a file or a folder), else `.lavis/` at the repository root; fetch it
with `.ci/fetch_lavis_wheel.sh`.
"""

from __future__ import annotations

import os
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
import transformers.pytorch_utils

WHEEL_NAME = "salesforce_lavis-1.0.2-py3-none-any.whl"
REPO = Path(__file__).resolve().parents[1]
FILES = ("lavis/models/base_model.py", "lavis/models/blip2_models/Qformer.py", "lavis/models/blip2_models/blip2.py",
         "lavis/models/blip2_models/blip2_qformer.py", "lavis/models/blip_models/blip_outputs.py")


def wheel_path() -> Path:
    """The LAVIS wheel; fails (not skips) with the fetch command when it is absent."""
    given = Path(os.environ.get("LAVIS_WHEEL", REPO / ".lavis"))
    path = given / WHEEL_NAME if given.is_dir() else given
    if not path.is_file():
        pytest.fail(f"LAVIS wheel not found at {path}: run `.ci/fetch_lavis_wheel.sh` (pip download --no-deps "
                    f"salesforce-lavis==1.0.2 -d .lavis) or set LAVIS_WHEEL to the wheel or its folder.")
    return path


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _register(_name=None):
    return lambda cls: cls


def _invert_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
    mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]
    return (1.0 - mask.to(torch.float32)) * torch.finfo(torch.float32).min


def load_lavis(tmp_path: Path, monkeypatch) -> types.SimpleNamespace:
    """Import LAVIS's stage-1 modules from the wheel: `blip2_qformer`, `blip2`, `Qformer`, `base_model`."""
    with zipfile.ZipFile(wheel_path()) as wheel:
        for name in FILES:
            wheel.extract(name, tmp_path)
    root = tmp_path / "lavis"
    for folder in (root, root / "models", root / "models" / "blip2_models", root / "models" / "blip_models"):
        (folder / "__init__.py").write_text("")  # bare packages: LAVIS's own __init__ imports everything
    dist = torch.distributed
    stubs = {
        "lavis.common": _stub("lavis.common"),
        "lavis.common.registry": _stub("lavis.common.registry",
                                       registry=types.SimpleNamespace(register_model=_register)),
        "lavis.common.dist_utils": _stub(
            "lavis.common.dist_utils", download_cached_file=None, is_main_process=lambda: True,
            is_dist_avail_and_initialized=lambda: dist.is_available() and dist.is_initialized()),
        "lavis.common.utils": _stub("lavis.common.utils", get_abs_path=None, is_url=None),
        "lavis.common.logger": _stub("lavis.common.logger", MetricLogger=None),
        "lavis.models.eva_vit": _stub("lavis.models.eva_vit", create_eva_vit_g=None),
        "lavis.models.clip_vit": _stub("lavis.models.clip_vit", create_clip_vit_L=None),
        "omegaconf": _stub("omegaconf", OmegaConf=None),
    }
    for name in [n for n in sys.modules if n == "lavis" or n.startswith("lavis.")]:
        monkeypatch.delitem(sys.modules, name)
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    # transformers 5 moved / removed these helpers; LAVIS's Q-Former imports them from modeling_utils
    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        monkeypatch.setattr(transformers.modeling_utils, name, getattr(transformers.pytorch_utils, name, None),
                            raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    import lavis.models.base_model as base_model
    import lavis.models.blip2_models.blip2_qformer as blip2_qformer
    import lavis.models.blip2_models.Qformer as qformer
    import lavis.models.blip2_models.blip2 as blip2

    # transformers 5 dropped head masks; LAVIS passes `None` per layer through them
    monkeypatch.setattr(qformer.BertModel, "get_head_mask", lambda self, mask, layers: [None] * layers,
                        raising=False)
    # transformers 4's additive encoder mask, removed in 5 (LAVIS's image masks are all ones: adds 0)
    monkeypatch.setattr(qformer.BertModel, "invert_attention_mask", _invert_attention_mask, raising=False)
    # transformers 5's `init_weights` ties through tables LAVIS's old-style classes lack; the tests set every weight
    monkeypatch.setattr(qformer.BertPreTrainedModel, "init_weights", lambda self: None)
    return types.SimpleNamespace(blip2_qformer=blip2_qformer, Qformer=qformer, base_model=base_model, blip2=blip2)
