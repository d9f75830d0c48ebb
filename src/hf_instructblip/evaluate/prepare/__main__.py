"""`python -m hf_instructblip.evaluate.prepare --dataset gqa --annotations ... --images ... --output gqa.jsonl`."""
import sys

from .convert import main

sys.exit(main())
