"""Hub repo ids by huggingface_hub's own rules: one home for "is this a Hub id?", used by the evaluation CLI and
by publishing."""

from __future__ import annotations

from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id


def repo_id_problem(value: Any) -> str | None:
    """Why `value` is not a Hub repo id, or None when it is one.

    Example:
        >>> repo_id_problem("me/model") is None, repo_id_problem("a b") is None
        (True, False)
    """
    if value is None:  # validate_repo_id lets None through (a repo id is optional in its callers)
        return "a repo id is required"
    try:
        validate_repo_id(value)
    except HFValidationError as err:
        return str(err)
    return None


def is_hub_id(name: Any) -> bool:
    """Whether `name` is a full Hub repo id 'owner/name' (a bare name is a local path, not an id)."""
    return repo_id_problem(name) is None and "/" in name
