"""`python -m hf_instructblip.evaluate` on several processes, for `test_evaluate_distributed.py`.

    python -m torch.distributed.run --nproc_per_node 2 _evaluate_worker.py PLAN.json

PLAN.json: a list of runs `{"tag": str, "argv": [CLI arguments], "die": [rank, batches] | null}`, run in order by
every process through the CLI's `main`. Each process records the ids it computed, batch by batch, in
`computed-{tag}-{rank}.json` next to PLAN.json. With `die`, process `rank` is killed (`os._exit`, no cleanup) right
after appending its `batches`-th batch: an interruption, as a crash or a preempted job leaves it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from hf_instructblip.evaluate import cli, runner

APPEND = runner._append  # the runner's row writer


def record_appends(out_file: Path, die_after: int | None) -> None:
    """Make the runner note the ids this process computes (rows appended to its part file), and die right after
    appending its `die_after`-th batch."""
    computed: list = []

    def recording(path: Path, rows: list[dict]) -> None:
        APPEND(path, rows)
        if ".part" not in path.name:  # the main process merging the part files
            return
        computed.append([row["id"] for row in rows])
        out_file.write_text(json.dumps(computed))
        if len(computed) == die_after:
            os._exit(1)

    runner._append = recording


def main(plan_file: Path) -> None:
    torch.set_num_threads(1)  # two processes share a small machine
    rank = int(os.environ["RANK"])
    for run in json.loads(plan_file.read_text()):
        die = run.get("die")
        record_appends(plan_file.parent / f"computed-{run['tag']}-{rank}.json",
                       die[1] if die and die[0] == rank else None)
        if cli.main(run["argv"]) != 0:
            sys.exit(2)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
