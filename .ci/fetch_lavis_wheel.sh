#!/usr/bin/env bash
# The salesforce-lavis 1.0.2 wheel (no dependencies): the stage-1 parity tests read LAVIS's own blip2_qformer.py,
# blip2.py, Qformer.py and base_model.py from it at test time (modeling_tests/lavis_stage1.py). Nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f .lavis/salesforce_lavis-1.0.2-py3-none-any.whl ]; then
  python -m pip download --no-deps --quiet salesforce-lavis==1.0.2 -d .lavis
fi
