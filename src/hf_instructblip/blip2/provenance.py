"""The provenance report of a BLIP-2 start: which source gave every tensor of the model, which are new and how
they were made, and what each source had that was left out (with the reason).

Example:
    >>> model, processor = result = from_blip2(blip2=..., language_model=..., qformer_text=...)
    >>> print(result.provenance.summary())
    vision encoder: 12 tensors from blip2 (transformers BLIP-2 ...)
    ...
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .keys import group_of

NEW = "new"


@dataclass
class Provenance:
    """`origin[key] = (role, detail)`: role is "blip2", "qformer_text", "language_model" or "new"; detail is the
    source key, or for new tensors how they were initialised."""

    sources: dict[str, str] = field(default_factory=dict)  # role -> description of the source
    origin: dict[str, tuple[str, str]] = field(default_factory=dict)
    dropped: dict[str, dict[str, str]] = field(default_factory=dict)  # role -> {source key: reason}
    notes: list[str] = field(default_factory=list)

    def add(self, role: str, origin: dict[str, str]) -> None:
        """Record `role` as the source of every key of `origin` (our key -> source key)."""
        for key, source_key in origin.items():
            self.origin[key] = (role, source_key)

    def keys_from(self, role: str) -> list[str]:
        return sorted(key for key, (given_by, _) in self.origin.items() if given_by == role)

    def unaccounted(self, keys) -> list[str]:
        """The model keys without an origin (must be none)."""
        return sorted(set(keys) - set(self.origin))

    def groups(self) -> dict[tuple[str, str], int]:
        """(weight group, role) -> tensor count."""
        return dict(Counter((group_of(key), role) for key, (role, _) in self.origin.items()))

    def summary(self) -> str:
        lines = [f"{group}: {count} tensors from {role}" + (f" ({self.sources[role]})" if role in self.sources else "")
                 for (group, role), count in sorted(self.groups().items())]
        lines += [f"new: {key} ({how})" for key, (role, how) in sorted(self.origin.items()) if role == NEW]
        for role, dropped in self.dropped.items():
            for reason, count in sorted(Counter(dropped.values()).items()):
                lines.append(f"left out of {role}: {count} x {reason}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)
