"""`import hf_instructblip` vs importing transformers' InstructBLIP model and processor, in fresh processes.

Each repetition starts one new Python process per side, alternating sides (so a load spike hits both), and times the
import inside it. Ours also reports which heavy optional modules the import left out of `sys.modules` and whether
it printed anything (it must not: an inference user should pay nothing for training, TRL, PEFT or bitsandbytes).

    python bench/bench_import.py            # 7 repetitions per side, ~1-2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import common

# Modules an inference-only `import hf_instructblip` must not load.
HEAVY = ("peft", "trl", "datasets", "deepspeed", "bitsandbytes", "transformers.trainer")
STATEMENTS = {
    "ours": "import hf_instructblip",
    "theirs": "from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor",
}
_PROBE = """
import sys, time, json
start = time.perf_counter()
{statement}
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def time_import(statement: str) -> tuple[float, list[str], str]:
    """(seconds, heavy modules loaded, anything else printed on stdout / stderr) of one fresh process."""
    done = subprocess.run([sys.executable, "-c", _PROBE.format(statement=statement, heavy=HEAVY)],
                          capture_output=True, text=True, check=True)
    *noise, last = done.stdout.strip().splitlines() or [""]
    result = json.loads(last)
    return result["seconds"], result["loaded"], "\n".join(noise) + done.stderr


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=7, help="fresh processes per side")
    args = parser.parse_args(argv)
    common.emit({"env": common.environment("cpu")})
    times: dict[str, list[float]] = {side: [] for side in common.SIDES}
    loaded, printed = set(), ""
    for _ in range(args.reps):
        for side in common.SIDES:
            seconds, heavy, noise = time_import(STATEMENTS[side])
            times[side].append(seconds)
            if side == "ours":
                loaded.update(heavy)
                printed += noise
    record = common.figure({"statement": STATEMENTS}, "import_s", "s", times["ours"], times["theirs"])
    common.emit({**record, "heavy_modules_loaded": sorted(loaded), "printed": printed})


if __name__ == "__main__":
    main()
