"""The policy-folder contract: one sub-folder per safety dimension, validated as untrusted input.

Layout::

    <root>/<name>/policy.toml          required; description, source, license, optional [fgsn] overrides
    <root>/<name>/harmful.jsonl        required; prompts used to localise the dimension's neurons
    <root>/<name>/harmful_eval.jsonl   optional; held-out prompts for evaluation
    <root>/<name>/benign.jsonl         optional; replaces the shared benign prompts for this dimension

Rules: names match ``NAME_PATTERN``; hidden (``.x``) and temporary (``x~``, ``x.tmp``, ``x.partial``,
``#x#``) entries are skipped; any other non-matching entry is reported as invalid, never silently
dropped. Files are size-bounded, must be regular files, and a symlink may only point inside its own
dimension folder. Other files in a dimension folder (licences, notes) are ignored. Every
user-caused problem raises :class:`PolicyError` or :class:`PromptFileError`, both ``FGSNError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails

from fgsn_daemon.core.errors import PolicyError, PromptFileError
from fgsn_daemon.core.params import overrides_model
from fgsn_daemon.core.prompts import decode_text, load_prompts, parse_prompt_lines

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
POLICY_FILE = "policy.toml"
HARMFUL_FILE = "harmful.jsonl"
HARMFUL_EVAL_FILE = "harmful_eval.jsonl"
BENIGN_FILE = "benign.jsonl"
# Fixed order of the fingerprint; also the set of files the contract knows about.
CONTRACT_FILES = (POLICY_FILE, HARMFUL_FILE, HARMFUL_EVAL_FILE, BENIGN_FILE)

# Module-level so tests (and cautious deployments) can lower them.
MAX_JSONL_BYTES = 16 * 1024 * 1024
MAX_TOML_BYTES = 64 * 1024

_TEMP_SUFFIXES = ("~", ".tmp", ".partial")

Percent = Annotated[float, Field(gt=0, le=100)]


# Per-dimension overrides of the daemon's FGSN parameters (``[fgsn]`` table): generated from the
# parameters' one declaration (``core.params``), so their bounds are the same.
FGSNOverrides = overrides_model()


class PolicySpec(BaseModel):
    """The validated content of ``policy.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    description: Annotated[str, Field(min_length=1, max_length=4000)]
    # TOML may give one string or a list; stored as a list so there is one canonical form.
    source: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=100)]
    license: Annotated[str, Field(min_length=1, max_length=4000)]
    fgsn: FGSNOverrides = FGSNOverrides()  # type: ignore[valid-type]

    @field_validator("source", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of strings")
        return value


@dataclass(frozen=True)
class InvalidEntry:
    """A visible entry of the policy root that is not a usable dimension folder."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Dimension:
    """A loaded, validated dimension."""

    name: str
    path: Path
    spec: PolicySpec
    harmful: tuple[str, ...]
    harmful_eval: tuple[str, ...] | None
    benign: tuple[str, ...] | None
    fingerprint: str
    files: tuple[str, ...]  # contract files present, in CONTRACT_FILES order


def is_ignored_name(name: str) -> bool:
    """Hidden and editor/downloader temporary names, which are never dimensions."""
    return (
        name.startswith(".")
        or name.endswith(_TEMP_SUFFIXES)
        or (len(name) > 1 and name.startswith("#") and name.endswith("#"))
    )


def check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise PolicyError(
            f"invalid dimension name {name!r}: use 1-64 characters from a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )


def list_dimension_dirs(root: str | os.PathLike[str]) -> tuple[list[Path], list[InvalidEntry]]:
    """Valid-looking dimension folders under ``root`` (sorted), and the entries that are not."""
    base = Path(root)
    try:
        entries = sorted(os.scandir(base), key=lambda e: e.name)
    except OSError as exc:
        raise PolicyError(f"{base}: cannot list the policy folder ({exc.strerror})") from None
    dirs: list[Path] = []
    invalid: list[InvalidEntry] = []
    for entry in entries:
        if is_ignored_name(entry.name):
            continue
        path = base / entry.name
        reason = _entry_problem(entry)
        if reason is None:
            dirs.append(path)
        else:
            invalid.append(InvalidEntry(path, reason))
    return dirs, invalid


def _entry_problem(entry: os.DirEntry[str]) -> str | None:
    try:
        check_name(entry.name)
    except PolicyError as exc:
        return str(exc)
    try:
        # A linked dimension could alias another one or leave the root: refuse them all.
        if entry.is_symlink():
            return "dimension folders may not be symbolic links"
        if not entry.is_dir(follow_symlinks=False):
            return "not a directory"
    except OSError as exc:
        return f"cannot inspect ({exc.strerror})"
    return None


def _limit_for(filename: str) -> int:
    return MAX_TOML_BYTES if filename == POLICY_FILE else MAX_JSONL_BYTES


def read_dimension_file(folder: Path, filename: str) -> bytes | None:
    """Bytes of ``folder/filename``, or None when absent; refuses unsafe or oversized files."""
    path = folder / filename
    limit = _limit_for(filename)
    try:
        if not os.path.lexists(path):
            return None
        target = _contained_target(folder, path)
        # O_NONBLOCK: a FIFO swapped in after the checks must not hang the daemon on open().
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise PolicyError(f"{path}: cannot open ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PolicyError(f"{path}: not a regular file")
        if info.st_nlink > 1:  # like a symlink out of the folder: its content may change elsewhere
            raise PolicyError(
                f"{path}: has {info.st_nlink - 1} other hard link(s); copy the file into the folder instead"
            )
        if info.st_size > limit:
            raise PolicyError(f"{path}: {info.st_size} bytes is over the {limit}-byte limit")
        data = _read_at_most(fd, limit + 1)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # the file grew after fstat
        raise PolicyError(f"{path}: over the {limit}-byte limit")
    return data


def _read_at_most(fd: int, n: int) -> bytes:
    chunks: list[bytes] = []
    while n > 0:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _contained_target(folder: Path, path: Path) -> Path:
    """Resolved target of ``path``; a symlink must stay inside the dimension folder."""
    if not path.is_symlink():
        return path
    try:
        target = path.resolve(strict=True)
        home = folder.resolve(strict=True)
    except (OSError, RuntimeError):
        raise PolicyError(f"{path}: broken or looping symbolic link") from None
    if not target.is_relative_to(home):
        raise PolicyError(f"{path}: symbolic link points outside the dimension folder ({target})")
    return target


def parse_policy_toml(data: bytes, source: str = POLICY_FILE) -> PolicySpec:
    """Validate policy.toml bytes; errors name the file and every offending key."""
    try:
        text = decode_text(data, source)
    except PromptFileError as exc:
        raise PolicyError(str(exc)) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML ({exc})") from None
    except RecursionError:  # the parsers recurse on nesting: hostile input must not escape as this
        raise PolicyError(f"{source}: nested too deeply") from None
    try:
        return PolicySpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(dict.fromkeys(_describe_error(err) for err in exc.errors()))
        raise PolicyError(f"{source}: {problems}") from None


def _describe_error(err: ErrorDetails) -> str:
    key = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if err["type"] == "missing":
        return f"missing key '{key}'"
    got = type(err.get("input")).__name__
    return f"key '{key}': {err['msg']} (got {got})"


def fingerprint(spec: PolicySpec, blobs: dict[str, bytes | None]) -> str:
    """sha256 over the canonical spec and the JSONL bytes, framed and in CONTRACT_FILES order.

    The spec enters as canonical JSON, so comments and formatting in policy.toml do not count.
    """
    digest = hashlib.sha256(b"fgsn-dimension-v1\0")
    for name in CONTRACT_FILES:
        if name == POLICY_FILE:
            body: bytes | None = json.dumps(
                spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
            ).encode("utf-8")
        else:
            body = blobs.get(name)
        digest.update(name.encode("ascii") + b"\0")
        if body is None:
            digest.update(b"absent\0")
        else:
            digest.update(b"%d\0" % len(body) + body)
    return digest.hexdigest()


def parse_prompts(data: bytes, source: str) -> list[str]:
    """``parse_prompt_lines``, with deeply nested JSON turned into a PromptFileError."""
    try:
        return parse_prompt_lines(data, source)
    except RecursionError:
        raise PromptFileError(f"{source}: JSON nested too deeply") from None


def _read_all(path: Path) -> tuple[PolicySpec, dict[str, bytes | None]]:
    check_name(path.name)
    if path.is_symlink() or not path.is_dir():
        raise PolicyError(f"{path}: not a dimension folder (a real directory is required)")
    blobs = {name: read_dimension_file(path, name) for name in CONTRACT_FILES}
    for required in (POLICY_FILE, HARMFUL_FILE):
        if blobs[required] is None:
            raise PolicyError(f"{path}: missing {required}")
    toml_bytes = blobs[POLICY_FILE]
    assert toml_bytes is not None
    return parse_policy_toml(toml_bytes, str(path / POLICY_FILE)), blobs


def dimension_fingerprint(path: str | os.PathLike[str]) -> str:
    """Content fingerprint of a dimension folder, without parsing its prompts."""
    spec, blobs = _read_all(Path(path))
    return fingerprint(spec, blobs)


def load_dimension(path: str | os.PathLike[str]) -> Dimension:
    """Load and validate one dimension folder."""
    folder = Path(path)
    spec, blobs = _read_all(folder)

    def prompts(name: str) -> tuple[str, ...] | None:
        data = blobs[name]
        return None if data is None else tuple(parse_prompts(data, str(folder / name)))

    harmful = prompts(HARMFUL_FILE)
    assert harmful is not None
    return Dimension(
        name=folder.name,
        path=folder,
        spec=spec,
        harmful=harmful,
        harmful_eval=prompts(HARMFUL_EVAL_FILE),
        benign=prompts(BENIGN_FILE),
        fingerprint=fingerprint(spec, blobs),
        files=tuple(name for name in CONTRACT_FILES if blobs[name] is not None),
    )


# ---- bundled data -------------------------------------------------------------------------------

BUNDLED_DATA = ("benign.jsonl", "benign_eval.jsonl", "utility_train.jsonl", "utility_eval.jsonl")


@dataclass(frozen=True)
class UtilityItem:
    """A utility-task prompt with its exact expected answer."""

    prompt: str
    answer: str


def bundled_policies_dir() -> Path:
    """The bundled policies: the source tree's ``policies/`` folder beside the package, else the
    copy an installed wheel ships as ``fgsn_daemon/policies``."""
    checkout = Path(__file__).resolve().parents[2] / "policies"
    if checkout.is_dir():
        return checkout
    installed = Path(__file__).resolve().parents[1] / "policies"
    if installed.is_dir():
        return installed
    raise PolicyError(
        f"bundled policies not found at {installed} or {checkout}: reinstall fgsn-daemon "
        "(the wheel ships them as package data)"
    )


def _bundled_bytes(filename: str) -> bytes:
    if filename not in BUNDLED_DATA:
        raise PolicyError(f"unknown bundled data file {filename!r}; known: {', '.join(BUNDLED_DATA)}")
    try:
        return (resources.files("fgsn_daemon") / "data" / filename).read_bytes()
    except OSError as exc:
        raise PolicyError(f"bundled data {filename}: cannot read ({exc.strerror})") from None


def bundled_benign(split: Literal["train", "eval"] = "train") -> list[str]:
    """Shared benign prompts: ``train`` for localisation, ``eval`` (held out) for over-refusal."""
    filename = "benign.jsonl" if split == "train" else "benign_eval.jsonl"
    return parse_prompts(_bundled_bytes(filename), filename)


def parse_utility_lines(data: bytes, source: str) -> list[UtilityItem]:
    """Utility JSONL: each line has non-empty string ``prompt`` and ``answer``."""
    prompts = parse_prompts(data, source)  # validates encoding, JSON and the prompt field
    items: list[UtilityItem] = []
    lines = [(n, line) for n, line in enumerate(data.decode("utf-8").splitlines(), 1) if line.strip()]
    for (number, line), prompt in zip(lines, prompts, strict=True):
        answer = json.loads(line).get("answer")
        if not isinstance(answer, str) or not answer.strip():
            raise PromptFileError(f"{source}:{number}: 'answer' must be a non-empty string")
        items.append(UtilityItem(prompt, answer))
    return items


def bundled_utility(split: Literal["train", "eval"] = "train") -> list[UtilityItem]:
    """The utility task (topic codes of short sentences; see synthetic.py), with integer answers."""
    filename = f"utility_{split}.jsonl"
    return parse_utility_lines(_bundled_bytes(filename), filename)


REFERENCE_PER_DIMENSION = 40  # harmful prompts per dimension in the lineage's reference set


def reference_harmful_prompts(source: Path | None = None) -> list[str]:
    """A fixed harmful set per model lineage, for the layer curve and the refusal contrast's targets:
    both are properties of the lineage, not of whichever dimension arrives first (otherwise rolling
    back the first one could move the band).
    ``source``: a JSONL prompt file, or a policy folder whose dimensions each give their first
    prompts; None = the shipped policies."""
    if source is not None and source.is_file():
        return load_prompts(source)
    prompts: list[str] = []
    dirs, _ = list_dimension_dirs(bundled_policies_dir() if source is None else source)
    for d in dirs:
        prompts.extend(load_dimension(d).harmful[:REFERENCE_PER_DIMENSION])
    if not prompts:
        raise PolicyError(f"{source}: the band reference set has no harmful prompts")
    return prompts
