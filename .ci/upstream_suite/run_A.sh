#!/bin/bash
# (A) transformers' own InstructBLIP tests (5.16.0.dev0 tree, zucchini-nlp/transformers@decba1d2) against transformers' classes.
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/tf"
export HF_HUB_OFFLINE=1 HF_HUB_CACHE=$HERE/hf_cache PYTHONPATH=$HERE/.pydeps:$HERE/shims OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec python -m pytest -p compat_5_16_tests -p no:cacheprovider -q -rfEs -W ignore::pytest.PytestUnknownMarkWarning \
  tests/models/instructblip/test_modeling_instructblip.py tests/models/instructblip/test_processing_instructblip.py "$@"
