"""Shim: huggingface_hub 2.x ships httpx as `httpx2`; the 5.16-dev tests import `httpx`."""
import sys

import httpx2

sys.modules[__name__] = httpx2
