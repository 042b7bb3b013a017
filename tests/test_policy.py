"""The policy-folder contract: listing, validation, bounds, links and fingerprints."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fgsn_daemon.core import policy
from fgsn_daemon.core.errors import FGSNError, PolicyError, PromptFileError
from fgsn_daemon.core.policy import (
    bundled_benign,
    bundled_policies_dir,
    bundled_utility,
    dimension_fingerprint,
    list_dimension_dirs,
    load_dimension,
    parse_policy_toml,
)

GOOD_TOML = 'description = "Test dimension"\nsource = "unit test"\nlicense = "MIT"\n'


def jsonl(*prompts: str) -> str:
    return "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)


def make_dim(root: Path, name: str = "cyber", toml: str = GOOD_TOML, **files: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "policy.toml").write_text(toml)
    (folder / "harmful.jsonl").write_text(files.pop("harmful", jsonl("hack a bank", "write malware")))
    for stem, text in files.items():
        (folder / f"{stem}.jsonl").write_text(text)
    return folder


# ---- bundled content ---------------------------------------------------------------------------


def test_every_bundled_dimension_loads() -> None:
    dirs, invalid = list_dimension_dirs(bundled_policies_dir())
    assert invalid == []
    names = {d.name for d in dirs}
    assert {"cybercrime", "weapons", "drugs", "fraud", "harassment"} <= names
    seen: set[str] = set()
    for folder in dirs:
        dim = load_dimension(folder)
        assert dim.harmful_eval is not None and len(dim.harmful_eval) >= 20
        assert len(dim.harmful) >= 25
        assert set(dim.harmful).isdisjoint(dim.harmful_eval)
        prompts = set(dim.harmful) | set(dim.harmful_eval)
        assert seen.isdisjoint(prompts), f"{dim.name} shares prompts with another dimension"
        seen |= prompts
        assert dim.spec.license.startswith("MIT")
        assert (folder / "LICENSES").is_dir()


def test_bundled_policies_are_small() -> None:
    total = sum(p.stat().st_size for p in bundled_policies_dir().rglob("*") if p.is_file())
    assert total < 1024 * 1024


def test_bundled_benign_and_utility_load() -> None:
    assert len(bundled_benign("train")) >= 150 and len(bundled_benign("eval")) >= 80
    items = bundled_utility("eval")
    assert len(items) >= 80 and all(item.answer.lstrip("-").isdigit() for item in items)


# ---- listing -----------------------------------------------------------------------------------


def test_listing_skips_hidden_and_temporary_and_reports_invalid(tmp_path: Path) -> None:
    make_dim(tmp_path, "cyber")
    make_dim(tmp_path, "weapons_2-b")
    for ignored in (".git", ".cyber.swp", "cyber~", "new.tmp", "upload.partial", "#draft#"):
        (tmp_path / ignored).mkdir()
    (tmp_path / "Bad Name").mkdir()
    (tmp_path / "-leading").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "afile").write_text("x")
    dirs, invalid = list_dimension_dirs(tmp_path)
    assert [d.name for d in dirs] == ["cyber", "weapons_2-b"]
    reasons = {e.path.name: e.reason for e in invalid}
    assert set(reasons) == {"Bad Name", "-leading", "notes.txt", "afile"}
    assert "invalid dimension name" in reasons["Bad Name"]
    assert reasons["afile"] == "not a directory"


def test_listing_refuses_symlinked_dimension(tmp_path: Path) -> None:
    real = make_dim(tmp_path / "elsewhere", "real")
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(real, target_is_directory=True)
    dirs, invalid = list_dimension_dirs(root)
    assert dirs == [] and "symbolic link" in invalid[0].reason


def test_listing_missing_root(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot list"):
        list_dimension_dirs(tmp_path / "nope")


@pytest.mark.parametrize("name", ["a", "0day", "x" * 64, "a_b-c"])
def test_valid_names(name: str) -> None:
    policy.check_name(name)


@pytest.mark.parametrize("name", ["", "A", "_x", "-x", "x" * 65, "a.b", "a b", "é", "a/b"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(PolicyError, match="invalid dimension name"):
        policy.check_name(name)


def test_load_dimension_rejects_invalid_name(tmp_path: Path) -> None:
    folder = make_dim(tmp_path, "Cyber")
    with pytest.raises(PolicyError, match="invalid dimension name"):
        load_dimension(folder)


# ---- policy.toml ---------------------------------------------------------------------------------


def test_policy_toml_full_example() -> None:
    spec = parse_policy_toml(
        b'description = "d"\nsource = ["a", "b"]\nlicense = "MIT"\n'
        b'[fgsn]\nq = 3\np = 2.5\nscoring = "contrast"\npositions = "last"\nmax_prompts = 100\n'
    )
    assert spec.source == ["a", "b"] and spec.fgsn.q == 3.0 and spec.fgsn.max_prompts == 100
    assert parse_policy_toml(GOOD_TOML.encode()).source == ["unit test"]  # one string becomes a list


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("colour = 'red'\n", "unknown key 'colour'"),
        ("[fgsn]\nqq = 1\n", "unknown key 'fgsn.qq'"),
        ("[fgsn]\nq = '5'\n", "key 'fgsn.q'"),
        ("[fgsn]\nq = 0\n", "key 'fgsn.q'"),
        ("[fgsn]\np = 101\n", "key 'fgsn.p'"),
        ("[fgsn]\nscoring = 'Magic!'\n", "key 'fgsn.scoring'"),
        ("[fgsn]\nmax_prompts = 1.5\n", "key 'fgsn.max_prompts'"),
        ("fgsn = 3\n", "key 'fgsn'"),
    ],
)
def test_policy_toml_rejects_unknown_and_mistyped_keys(extra: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace(".", r"\.")):
        parse_policy_toml((GOOD_TOML + extra).encode(), "p.toml")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('description = 3\nsource = "s"\nlicense = "MIT"\n', "key 'description'.*got int"),
        ('description = "d"\nsource = 5\nlicense = "MIT"\n', "key 'source'.*string or a list"),
        ('description = "d"\nsource = []\nlicense = "MIT"\n', "key 'source'"),
        ('description = "d"\nsource = [1]\nlicense = "MIT"\n', r"key 'source\.0'"),
        ('description = "d"\nsource = "s"\n', "missing key 'license'"),
        ('description = ""\nsource = "s"\nlicense = "MIT"\n', "key 'description'"),
        ("description = \n", "not valid TOML"),
    ],
)
def test_policy_toml_errors(toml: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy_toml(toml.encode(), "p.toml")


def test_policy_toml_invalid_utf8() -> None:
    with pytest.raises(PolicyError, match="not valid UTF-8"):
        parse_policy_toml(b'description = "\xff"\n')


# ---- files ---------------------------------------------------------------------------------------


def test_load_dimension_reads_optional_files(tmp_path: Path) -> None:
    folder = make_dim(tmp_path, harmful_eval=jsonl("held out"), benign=jsonl("bake bread"))
    (folder / "README.md").write_text("extra files are ignored")
    (folder / "notes").mkdir()
    dim = load_dimension(folder)
    assert dim.name == "cyber"
    assert dim.harmful == ("hack a bank", "write malware")
    assert dim.harmful_eval == ("held out",) and dim.benign == ("bake bread",)
    assert dim.files == ("policy.toml", "harmful.jsonl", "harmful_eval.jsonl", "benign.jsonl")
    assert dim.fingerprint == dimension_fingerprint(folder)


def test_missing_required_files(tmp_path: Path) -> None:
    folder = make_dim(tmp_path)
    (folder / "harmful.jsonl").unlink()
    with pytest.raises(PolicyError, match=r"missing harmful\.jsonl"):
        load_dimension(folder)
    (folder / "harmful.jsonl").write_text(jsonl("x"))
    (folder / "policy.toml").unlink()
    with pytest.raises(PolicyError, match=r"missing policy\.toml"):
        load_dimension(folder)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no prompts"),
        (b"\n  \n", "no prompts"),
        (b'{"prompt": "ok"}\n{not json}\n', r"harmful\.jsonl:2: not valid JSON"),
        (b'{"prompt": "ok"}\n["a list"]\n', r"harmful\.jsonl:2: expected a JSON object"),
        (b'{"text": "no prompt field"}\n', r"harmful\.jsonl:1: 'prompt' must be"),
        (b'{"prompt": "caf\xe9"}\n', "not valid UTF-8"),
    ],
)
def test_malformed_jsonl(tmp_path: Path, content: bytes, message: str) -> None:
    folder = make_dim(tmp_path)
    (folder / "harmful.jsonl").write_bytes(content)
    with pytest.raises(PromptFileError, match=message):
        load_dimension(folder)


def test_deeply_nested_input_is_a_clear_error(tmp_path: Path) -> None:
    folder = make_dim(tmp_path)
    deep = b"[" * 100_000 + b"]" * 100_000
    (folder / "harmful.jsonl").write_bytes(b'{"prompt": "x", "extra": ' + deep + b"}\n")
    with pytest.raises(PromptFileError, match="nested too deeply"):
        load_dimension(folder)
    with pytest.raises(PolicyError, match="nested too deeply"):
        parse_policy_toml(GOOD_TOML.encode() + b"extra = " + deep + b"\n")


def test_malformed_optional_file_is_an_error_too(tmp_path: Path) -> None:
    folder = make_dim(tmp_path, harmful_eval="")
    with pytest.raises(PromptFileError, match=r"harmful_eval\.jsonl"):
        load_dimension(folder)


def test_oversized_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_dim(tmp_path, harmful=jsonl("x" * 200))
    monkeypatch.setattr(policy, "MAX_JSONL_BYTES", 100)
    with pytest.raises(PolicyError, match=r"harmful\.jsonl: \d+ bytes is over the 100-byte limit"):
        load_dimension(folder)
    monkeypatch.setattr(policy, "MAX_JSONL_BYTES", 10_000)
    monkeypatch.setattr(policy, "MAX_TOML_BYTES", 20)
    with pytest.raises(PolicyError, match=r"policy\.toml: .*over the 20-byte limit"):
        load_dimension(folder)


def test_symlink_outside_folder_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.jsonl"
    secret.write_text(jsonl("outside"))
    folder = make_dim(tmp_path / "root")
    (folder / "harmful.jsonl").unlink()
    (folder / "harmful.jsonl").symlink_to(secret)
    with pytest.raises(PolicyError, match="points outside the dimension folder"):
        load_dimension(folder)
    # ... also through a sibling dimension, which is still outside *this* folder.
    sibling = make_dim(tmp_path / "root", "other")
    (folder / "harmful.jsonl").unlink()
    (folder / "harmful.jsonl").symlink_to(Path("..") / sibling.name / "harmful.jsonl")
    with pytest.raises(PolicyError, match="points outside"):
        load_dimension(folder)


def test_symlink_inside_folder_is_allowed(tmp_path: Path) -> None:
    folder = make_dim(tmp_path)
    (folder / "data").mkdir()
    (folder / "harmful.jsonl").rename(folder / "data" / "h.jsonl")
    (folder / "harmful.jsonl").symlink_to(Path("data") / "h.jsonl")
    assert load_dimension(folder).harmful == ("hack a bank", "write malware")


def test_broken_and_looping_symlinks(tmp_path: Path) -> None:
    folder = make_dim(tmp_path)
    (folder / "harmful_eval.jsonl").symlink_to(folder / "missing.jsonl")
    with pytest.raises(PolicyError, match="broken or looping"):
        load_dimension(folder)
    (folder / "harmful_eval.jsonl").unlink()
    (folder / "benign.jsonl").symlink_to(folder / "benign.jsonl")
    with pytest.raises(PolicyError, match="broken or looping"):
        load_dimension(folder)


def test_non_regular_files_are_refused(tmp_path: Path) -> None:
    folder = make_dim(tmp_path)
    (folder / "benign.jsonl").mkdir()
    with pytest.raises(PolicyError, match=r"benign\.jsonl"):
        load_dimension(folder)
    (folder / "benign.jsonl").rmdir()
    os.mkfifo(folder / "benign.jsonl")  # must not hang on open
    with pytest.raises(PolicyError, match="not a regular file"):
        load_dimension(folder)


def test_dimension_path_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "cyber").write_text("x")
    with pytest.raises(PolicyError, match="not a dimension folder"):
        load_dimension(tmp_path / "cyber")


# ---- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_changes_with_content_only(tmp_path: Path) -> None:
    folder = make_dim(tmp_path)
    base = dimension_fingerprint(folder)
    assert dimension_fingerprint(folder) == base
    # Not content: comments and layout of policy.toml, unrelated files, mtimes.
    (folder / "policy.toml").write_text("# a comment\n" + GOOD_TOML.replace(" = ", "="))
    (folder / "NOTES.md").write_text("ignored")
    os.utime(folder / "harmful.jsonl", (0, 0))
    assert dimension_fingerprint(folder) == base
    # Same directory content in another folder gives the same fingerprint.
    assert dimension_fingerprint(make_dim(tmp_path / "copy")) == base

    changes: list[Callable[[], object]] = [
        lambda: (folder / "harmful.jsonl").write_text(jsonl("hack a bank", "write malware", "new")),
        lambda: (folder / "policy.toml").write_text(GOOD_TOML + "[fgsn]\nq = 2\n"),
        lambda: (folder / "harmful_eval.jsonl").write_text(jsonl("held out")),
        lambda: (folder / "benign.jsonl").write_text(jsonl("bake")),
        lambda: (folder / "benign.jsonl").write_text(jsonl("bake") + "\n"),  # bytes, not just prompts
    ]
    seen = {base}
    for change in changes:
        change()
        fp = dimension_fingerprint(folder)
        assert fp not in seen
        seen.add(fp)


def test_fingerprint_distinguishes_which_file_holds_the_bytes(tmp_path: Path) -> None:
    a = make_dim(tmp_path / "a", harmful_eval=jsonl("x"))
    b = make_dim(tmp_path / "b", benign=jsonl("x"))
    assert dimension_fingerprint(a) != dimension_fingerprint(b)


def test_errors_are_fgsn_errors() -> None:
    assert issubclass(PolicyError, FGSNError) and issubclass(PromptFileError, FGSNError)


def test_overrides_have_the_same_bounds_as_the_daemon_parameters():
    """One declaration: a dimension's [fgsn] value is accepted exactly when the same value is
    accepted in the daemon's [params] (a per-dimension p of 0 used to be refused, a global one not)."""
    from pydantic import ValidationError

    from fgsn_daemon.core.params import OVERRIDABLE, FGSNFields

    spec = policy.parse_policy_toml((GOOD_TOML + "[fgsn]\np = 0\n").encode())
    assert spec.fgsn.p == 0.0
    probes = {
        "q": [-1.0, 0.0, 0.5, 100.0, 100.5],
        "p": [-1.0, 0.0, 0.5, 100.0, 100.5],
        "budget": [-1.0, 0.0, 0.5, 100.0, 100.5],
        "contrast": [-1.0, 0.0, 0.5, 100.0, 100.5],
        "scoring": ["contrast", "Magic!", "x" * 65],
        "positions": ["all", "last", "first"],
    }
    assert set(probes) == set(OVERRIDABLE)

    def accepts(model, name, value) -> bool:
        try:
            model(**{name: value})
        except ValidationError:
            return False
        return True

    for name, values in probes.items():
        for value in values:
            assert accepts(policy.FGSNOverrides, name, value) == accepts(FGSNFields, name, value), (
                name,
                value,
            )
