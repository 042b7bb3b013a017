"""Reading prompt files (JSON Lines) defensively: they come from people and scripts.

Format: one JSON object per line with a non-empty string field ``prompt``; other fields are
kept but ignored. Blank lines are skipped. Everything else is an error naming the line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fgsn_daemon.errors import PromptFileError

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PROMPT_CHARS = 32_000
MAX_PROMPTS = 200_000


def parse_prompt_lines(data: bytes, source: str = "<bytes>") -> list[str]:
    """Parse JSONL bytes into prompts, raising PromptFileError with the offending line number."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{source}: not valid UTF-8 (byte {exc.start})") from None
    prompts: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{source}:{number}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise PromptFileError(f"{source}:{number}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{source}:{number}: expected a JSON object with a 'prompt' field")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f"{source}:{number}: 'prompt' must be a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PromptFileError(f"{source}:{number}: prompt longer than {MAX_PROMPT_CHARS} characters")
        prompts.append(prompt)
        if len(prompts) > MAX_PROMPTS:
            raise PromptFileError(f"{source}: more than {MAX_PROMPTS} prompts")
    if not prompts:
        raise PromptFileError(f"{source}: no prompts (the file is empty)")
    return prompts


def load_prompts(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> list[str]:
    """Load a prompt JSONL file; refuses missing, non-regular, oversized or malformed files."""
    p = Path(path)
    if not p.exists():
        raise PromptFileError(f"{p}: file not found")
    if not p.is_file():
        raise PromptFileError(f"{p}: not a regular file")
    size = p.stat().st_size
    if size > max_bytes:
        raise PromptFileError(f"{p}: {size} bytes is over the {max_bytes}-byte limit")
    return parse_prompt_lines(p.read_bytes(), str(p))
