"""Reading prompt files (JSON Lines) defensively: they come from people and scripts.

Format: one JSON object per line with a non-empty string field ``prompt``; other fields are
kept but ignored. Blank lines are skipped. Everything else is an error naming the line.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from fgsn_daemon.core.errors import PromptFileError

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PROMPT_CHARS = 32_000
MAX_PROMPTS = 200_000

T = TypeVar("T")


def spread(items: Sequence[T], n: int) -> list[T]:
    """At most ``n`` items evenly spaced through ``items``, in order. Prompt files are often grouped
    (the organism's lists one action under all its templates, then the next), so the first N
    would cover a handful of actions only."""
    if len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def decode_text(data: bytes, source: str) -> str:
    """UTF-8 text of a user file: a leading byte-order mark is dropped (editors write one), NUL
    bytes are refused (they end strings early in tokenizers and logs)."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    nul = data.find(b"\0")
    if nul >= 0:
        raise PromptFileError(f"{source}: contains a NUL byte (byte {nul}); text files only")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{source}: not valid UTF-8 (byte {exc.start})") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise ValueError(f"duplicate key {k!r}")
    return dict(pairs)


def parse_prompt_records(data: bytes, source: str = "<bytes>") -> list[dict[str, object]]:
    """Parse JSONL bytes into records, each with a valid ``prompt`` (other fields, such as a
    ``category``, kept as given), raising PromptFileError with the offending line number."""
    text = decode_text(data, source)
    records: list[dict[str, object]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{source}:{number}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise PromptFileError(f"{source}:{number}: JSON nested too deeply") from None
        except ValueError as exc:  # a duplicate key: which value was meant is unknowable
            raise PromptFileError(f"{source}:{number}: {exc}") from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{source}:{number}: expected a JSON object with a 'prompt' field")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f"{source}:{number}: 'prompt' must be a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PromptFileError(f"{source}:{number}: prompt longer than {MAX_PROMPT_CHARS} characters")
        records.append(obj)
        if len(records) > MAX_PROMPTS:
            raise PromptFileError(f"{source}: more than {MAX_PROMPTS} prompts")
    if not records:
        raise PromptFileError(f"{source}: no prompts (the file is empty)")
    return records


def prompts_of(records: Sequence[Mapping[str, object]]) -> list[str]:
    return [str(r["prompt"]) for r in records]


def parse_prompt_lines(data: bytes, source: str = "<bytes>") -> list[str]:
    """Parse JSONL bytes into prompts, raising PromptFileError with the offending line number."""
    return prompts_of(parse_prompt_records(data, source))


def load_prompts(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> list[str]:
    """Load a prompt JSONL file; refuses missing, non-regular, oversized or malformed files."""
    return prompts_of(load_prompt_records(path, max_bytes))


def load_prompt_records(
    path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES
) -> list[dict[str, object]]:
    """``load_prompts`` keeping each line's whole record."""
    p = Path(path)
    if not p.exists():
        raise PromptFileError(f"{p}: file not found")
    if not p.is_file():
        raise PromptFileError(f"{p}: not a regular file")
    size = p.stat().st_size
    if size > max_bytes:
        raise PromptFileError(f"{p}: {size} bytes is over the {max_bytes}-byte limit")
    return parse_prompt_records(p.read_bytes(), str(p))
