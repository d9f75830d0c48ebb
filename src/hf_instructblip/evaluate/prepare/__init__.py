"""Converters from the files each held-out dataset distributes to the evaluation records of `evaluate.tasks`
(`python -m hf_instructblip.evaluate.prepare --list`); which file and split each expects: `sources.SOURCES`."""

from .convert import CONVERTERS, PrepareSummary, describe_sources, main, prepare_dataset
from .sources import SOURCES, DatasetSource

__all__ = ["CONVERTERS", "SOURCES", "DatasetSource", "PrepareSummary", "describe_sources", "main", "prepare_dataset"]
