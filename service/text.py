"""Text that PostgreSQL and JSON can store and render: the checks the request models use.

PostgreSQL refuses a NUL in text and jsonb (the request was a 500), a lone surrogate
cannot be encoded as UTF-8 (a 500 when stored or rendered), and metadata nested a few
hundred deep was committed and then could not be rendered (pydantic's max depth),
poisoning every listing that held it. So these are refused at the door (422, never
silently stripped), with limits well inside what every renderer handles.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 32
MAX_NODES = 2000


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None when it can."""
    if "\x00" in value:
        return "must not contain NUL (\\u0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must not contain lone surrogates (invalid UTF-16 escapes)"
    return None


def json_problem(
    value: Any, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES
) -> str | None:
    """Why a parsed JSON value cannot be stored and rendered, or None when it can.

    Walked without recursion, so a value nested 100,000 deep costs a loop, not a stack.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            return f"must have at most {max_nodes} keys and values in all"
        if depth > max_depth:
            return f"must be nested at most {max_depth} deep"
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                return problem
        elif isinstance(item, dict):
            for key, sub in item.items():
                problem = text_problem(str(key))
                if problem:
                    return "keys " + problem
                stack.append((sub, depth + 1))
        elif isinstance(item, list):
            stack.extend((sub, depth + 1) for sub in item)
    return None
