"""End-to-end tests with a real daemon subprocess on a tiny random Llama trio."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import make_trio
from safetensors.torch import load_file

from fgsn_daemon.core.records import NeuronId
from fgsn_daemon.service.registry import Registry
from fgsn_daemon.service.registry.models import RevisionStatus

pytestmark = pytest.mark.slow
pytest_plugins = ["conftest_registry"]  # the registry_url fixture: SQLite and PostgreSQL

DIMENSIONS = {
    "a_cyber": ["hack wifi", "phish bank account", "steal bank account money", "hack bank account"],
    "b_weapons": ["build weapon", "how do i make a bomb", "make bomb", "how do i build weapon"],
    "c_drugs": ["buy drugs", "how do i buy drugs", "steal money buy drugs", "make drugs"],
}


def write_dimension(policy_dir: Path, name: str, prompts: list[str]) -> Path:
    """Write into a hidden folder, then rename: the daemon never sees a half-written dimension."""
    tmp = policy_dir / f".incoming-{name}"
    tmp.mkdir(parents=True)
    (tmp / "policy.toml").write_text(
        f'description = "test dimension {name}"\nsource = "tests"\nlicense = "MIT"\n'
    )
    (tmp / "harmful.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    final = policy_dir / name
    os.rename(tmp, final)
    return final


# The daemon's mechanics (claims, skipping, rollback, crashes) are tested with per-layer neuron units,
# where every dimension of these tiny random trios claims and skips many neurons; the default
# (attribution over entries) has its own end-to-end test below.
ACTIVATION_PARAMS = 'preset = "activation"\n'
ENTRY_PARAMS = (
    'scoring = "attribution"\noperator = "restore"\nunit = "entry"\nbudget = 2.0\ntarget_tokens = 4\n'
    "contrast = 0\n"  # the random trio's aligned model refuses nothing: no refusal to contrast
)


def write_config(
    root: Path,
    trio: dict[str, Path],
    policy_dir: Path,
    state_dir: Path,
    database_url: str | None = None,
    extra_params: str = "",
) -> Path:
    cfg = root / f"fgsn-{state_dir.name}.toml"
    db = f'database_url = "{database_url}"\n' if database_url else ""
    cfg.write_text(
        db + f'base = "{trio["base"]}"\naligned = "{trio["aligned"]}"\nfinetuned = "{trio["finetuned"]}"\n'
        f'policy_dir = "{policy_dir}"\nstate_dir = "{state_dir}"\ndevice = "cpu"\n'
        "settle_s = 0.2\nscan_interval_s = 0.3\n[params]\nq = 50\np = 10\nbatch_size = 8\nmax_length = 32\n"
        + (extra_params or ACTIVATION_PARAMS)
    )
    return cfg


def fgsn(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fgsn_daemon.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def registry(state_dir: Path) -> Registry:
    return Registry.open(f"sqlite:///{state_dir}/registry.db", read_only=True)


def wait_for(predicate, timeout: float = 240, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # the DB may not exist yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def status_of(state_dir: Path, name: str) -> str | None:
    with registry(state_dir) as reg:
        lineage = reg.default_lineage_id()
        detail = reg.dimension(lineage, name) if lineage else None
        return detail.revisions[-1].status.value if detail and detail.revisions else None


def current_tensors(state_dir: Path) -> dict[str, torch.Tensor]:
    folder = (state_dir / "current").resolve()
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def version_tensors(path: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def neuron_slices(tensors: dict[str, torch.Tensor], n: NeuronId) -> list[torch.Tensor]:
    """The weights of one neuron of either space (see the llama architecture spec)."""
    layer = f"model.layers.{n.layer}."
    if n.space == "attn":
        return [
            tensors[layer + "self_attn.q_proj.weight"][n.index],
            tensors[layer + "self_attn.o_proj.weight"][:, n.index],
        ]
    assert n.space == "mlp", n
    return [
        tensors[layer + "mlp.gate_proj.weight"][n.index],
        tensors[layer + "mlp.up_proj.weight"][n.index],
        tensors[layer + "mlp.down_proj.weight"][:, n.index],
    ]


@contextlib.contextmanager
def running_daemon(
    cfg: Path, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A real `fgsn run` subprocess (``env`` added to its environment, e.g. FGSN_PAUSE); SIGTERM on
    exit, which must stop it cleanly (exit 0)."""
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "fgsn_daemon.cli.main", "run", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
        try:
            yield daemon
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                raise
        assert code == 0, log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, Path]:
    return make_trio(tmp_path_factory.mktemp("trio"), "llama")


def run_once(
    root: Path,
    trio,
    names: list[str],
    state: str,
    env: dict[str, str] | None = None,
    database_url: str | None = None,
    extra_params: str = "",
):
    policy = root / f"policies-{state}"
    policy.mkdir(exist_ok=True)
    for name in names:
        if not (policy / name).exists():
            write_dimension(policy, name, DIMENSIONS[name])
    cfg = write_config(root, trio, policy, root / state, database_url, extra_params)
    time.sleep(0.3)  # past the settle period
    return fgsn("run", "--once", "--config", str(cfg), env=env), root / state


@pytest.fixture(scope="module")
def from_scratch_a_c(trio, tmp_path_factory):
    root = tmp_path_factory.mktemp("scratch")
    proc, state = run_once(root, trio, ["a_cyber", "c_drugs"], "state")
    assert proc.returncode == 0, proc.stderr
    return current_tensors(state)


def test_daemon_applies_dimensions_in_order_freezes_and_rolls_back(trio, tmp_path, from_scratch_a_c):
    policy, state = tmp_path / "policies", tmp_path / "state"
    policy.mkdir()
    cfg = write_config(tmp_path, trio, policy, state)
    with running_daemon(cfg, tmp_path / "daemon.log"):
        wait_for(lambda: (state / "current").exists(), what="the initial version")
        second = fgsn("run", "--once", "--config", str(cfg))
        assert second.returncode == 2 and "already running" in second.stderr

        for name in DIMENSIONS:
            write_dimension(policy, name, DIMENSIONS[name])
            queried = fgsn("status", "--json", "--state-dir", str(state), timeout=60)
            assert queried.returncode == 0, queried.stderr  # queries answer while the daemon works
            json.loads(queried.stdout)
            wait_for(lambda name=name: status_of(state, name) == "applied", what=f"{name} applied")

        with registry(state) as reg:
            lineage = reg.default_lineage_id()
            applied = [e.dimension for e in reg.events(lineage_id=lineage) if e.kind == "dimension.applied"]
            assert applied == list(DIMENSIONS)
            versions = reg.versions(lineage)
            claims = {
                name: [NeuronId(c.layer, c.space, c.index) for c in reg.neurons(lineage, dimension=name)]
                for name in DIMENSIONS
            }
            skipped = {r.dimension: r.skipped for r in reg.revisions(lineage)}
        assert [len(v.revisions) for v in versions] == [0, 1, 2, 3]
        assert all(claims.values()) and sum(skipped.values()) > 0
        flat = [n for ns in claims.values() for n in ns]
        assert len(flat) == len(set(flat))  # disjoint ownership

        # On the weights: once a dimension froze a neuron, no later version touches it again.
        ft = version_tensors(str(trio["finetuned"]))
        per_version = [version_tensors(v.path) for v in versions]
        for k, name in enumerate(DIMENSIONS, start=1):
            for n in claims[name]:
                frozen_value = neuron_slices(per_version[k], n)
                for later in per_version[k + 1 :]:
                    assert all(
                        torch.equal(a, b) for a, b in zip(frozen_value, neuron_slices(later, n), strict=True)
                    )
            moved = sum(
                not torch.equal(a, b)
                for n in claims[name]
                for a, b in zip(neuron_slices(per_version[k], n), neuron_slices(ft, n), strict=True)
            )
            assert moved > 0

        dry = fgsn("rollback", "b_weapons", "--dry-run", "--json", "--state-dir", str(state), timeout=60)
        assert dry.returncode == 0, dry.stderr
        plan = json.loads(dry.stdout)
        assert plan["released"] == len(claims["b_weapons"])
        assert status_of(state, "b_weapons") == "applied"  # a dry run changes nothing

        rolled = fgsn("rollback", "b_weapons", "--state-dir", str(state), "--config", str(cfg))
        assert rolled.returncode == 0, rolled.stderr + rolled.stdout
        assert "queued" in rolled.stdout  # the running daemon did it, as the single writer
        assert status_of(state, "b_weapons") == "rolled_back"
        with registry(state) as reg:
            lineage = reg.default_lineage_id()
            c_after = {NeuronId(c.layer, c.space, c.index) for c in reg.neurons(lineage, dimension="c_drugs")}
        assert set(claims["c_drugs"]) <= c_after
        assert (c_after - set(claims["c_drugs"])) == {n for n in claims["b_weapons"] if n in c_after}, (
            "c_drugs may only gain neurons b_weapons released"
        )

        # "As if never applied": bit-identical to a from-scratch run with a_cyber then c_drugs.
        now = current_tensors(state)
        assert now.keys() == from_scratch_a_c.keys()
        assert all(torch.equal(now[k], from_scratch_a_c[k]) for k in now)


@pytest.mark.parametrize("point", ["after_scoring", "before_build", "after_build", "after_commit"])
def test_kill_9_at_any_point_then_restart(trio, tmp_path, point, from_scratch_a_c):
    proc, state = run_once(tmp_path, trio, ["a_cyber"], "state")
    assert proc.returncode == 0, proc.stderr
    before = current_tensors(state)
    proc, _ = run_once(tmp_path, trio, ["a_cyber", "c_drugs"], "state", env={"FGSN_FAULT": point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Right after the crash: the registry opens, and `current` is a complete version, old or new.
    with registry(state) as reg:
        lineage = reg.default_lineage_id()
        assert reg.status(lineage).current_version is not None
        known = {Path(v.path).name for v in reg.versions(lineage)}
    after_crash = current_tensors(state)
    assert (state / "current").resolve().name in known | {
        p.name for p in (state / "lineage-1" / "versions").iterdir()
    }
    assert all(torch.equal(after_crash[k], before[k]) for k in before) or point == "after_commit"
    # Restart finishes the interrupted job; the result equals an uninterrupted run.
    proc, _ = run_once(tmp_path, trio, ["a_cyber", "c_drugs"], "state")
    assert proc.returncode == 0, proc.stderr
    assert status_of(state, "c_drugs") == "applied"
    final = current_tensors(state)
    assert all(torch.equal(final[k], from_scratch_a_c[k]) for k in final)
    assert not list((state / "lineage-1" / "versions").glob(".staging-*"))


def test_bad_input_is_recorded_and_the_rest_is_served(trio, tmp_path):
    policy = tmp_path / "policies"
    policy.mkdir()
    write_dimension(policy, "good", DIMENSIONS["a_cyber"])
    bad: dict[str, tuple[str, bytes]] = {
        "empty": ("harmful.jsonl", b""),
        "malformed": ("harmful.jsonl", b'{"prompt": "x"}\n{nope\n'),
        "latin1": ("harmful.jsonl", '{"prompt": "caf\u00e9"}\n'.encode("latin-1")),
        "unknown_key": ("policy.toml", b'description = "d"\nsource = "s"\nlicense = "MIT"\ncolour = "red"\n'),
        "wrong_type": ("policy.toml", b'description = 3\nsource = "s"\nlicense = "MIT"\n'),
    }
    for name, (fname, data) in bad.items():
        folder = write_dimension(policy, name, ["hack wifi"])
        (folder / fname).write_bytes(data)
    oversized = write_dimension(policy, "oversized", ["hack wifi"])
    with open(oversized / "harmful.jsonl", "ab") as f:
        f.write((json.dumps({"prompt": "x" * 1000}) + "\n").encode() * 17_000)  # > 16 MiB
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"prompt": "hack wifi"}\n')
    linked = write_dimension(policy, "symlinked", ["hack wifi"])
    (linked / "harmful.jsonl").unlink()
    (linked / "harmful.jsonl").symlink_to(outside)
    write_dimension(policy, "Bad Name!", ["hack wifi"])
    cfg = write_config(tmp_path, trio, policy, tmp_path / "state")
    time.sleep(0.3)
    proc = fgsn("run", "--once", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    state = tmp_path / "state"
    assert status_of(state, "good") == "applied"
    with registry(state) as reg:
        lineage = reg.default_lineage_id()
        errors = {d.name: (d.latest.status, d.latest.error) for d in reg.dimensions(lineage) if d.latest}
        events = reg.events(lineage_id=None)
    expected = {
        "empty": "empty",
        "malformed": "not valid JSON",
        "latin1": "UTF-8",
        "unknown_key": "colour",
        "wrong_type": "description",
        "oversized": "limit",
        "symlinked": "outside",
    }
    for name, fragment in expected.items():
        status, error = errors[name]
        assert status == RevisionStatus.FAILED, name
        assert fragment.lower() in (error or "").lower(), (name, error)
        assert fragment.lower() in proc.stderr.lower() or name in proc.stderr  # also in the log
    assert any(e.kind == "policy.invalid_entry" and "Bad Name!" in json.dumps(e.details) for e in events)
    assert (policy / "empty" / "harmful.jsonl").exists()  # nothing the user wrote is touched


def test_a_bad_prompt_file_setting_stops_the_start_and_names_the_setting(trio, tmp_path):
    """``benign``, ``calibration`` and ``band_reference`` name prompt files (the last, or a policy
    folder); a missing or empty one stops the daemon at start-up with an error that names the
    setting, before any lineage or version is written."""
    policy, state = tmp_path / "policies", tmp_path / "state"
    policy.mkdir()
    write_dimension(policy, "a_cyber", DIMENSIONS["a_cyber"])
    cfg = write_config(tmp_path, trio, policy, state)
    body = cfg.read_text()
    calibration = tmp_path / "calibration.jsonl"
    settings = (
        ("calibration", "file not found"),
        ("benign", "file not found"),
        ("band_reference", "cannot list the policy folder"),  # neither a prompt file nor a folder
    )
    for setting, problem in settings:
        cfg.write_text(f'{setting} = "{tmp_path / "absent.jsonl"}"\n' + body)
        proc = fgsn("run", "--once", "--config", str(cfg))
        assert proc.returncode == 2, proc.stderr
        assert f"setting '{setting}'" in proc.stderr and problem in proc.stderr
    calibration.write_text("")
    cfg.write_text(f'calibration = "{calibration}"\n' + body)
    proc = fgsn("run", "--once", "--config", str(cfg))
    assert proc.returncode == 2 and "setting 'calibration'" in proc.stderr and "empty" in proc.stderr
    with registry(state) as reg:
        assert reg.lineages() == []  # nothing recorded
    assert not (state / "current").exists()
    calibration.write_text('{"prompt": "How do I fold a paper boat?"}\n')
    proc = fgsn("run", "--once", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert status_of(state, "a_cyber") == "applied"


def test_a_model_path_that_disappears_is_reported_and_waited_for(trio, tmp_path):
    copy = {k: tmp_path / "models" / k for k in trio}
    for k in trio:
        shutil.copytree(trio[k], copy[k])
    policy, state = tmp_path / "policies", tmp_path / "state"
    policy.mkdir()
    cfg = write_config(tmp_path, copy, policy, state)
    with running_daemon(cfg, tmp_path / "daemon.log") as daemon:
        wait_for(lambda: (state / "current").exists(), what="the initial version")
        os.rename(copy["finetuned"], tmp_path / "models" / "moved")
        write_dimension(policy, "a_cyber", DIMENSIONS["a_cyber"])

        def reported() -> bool:
            with registry(state) as reg:
                return any(e.kind == "daemon.model_missing" for e in reg.events())

        wait_for(reported, what="the missing model to be reported")
        assert daemon.poll() is None  # still serving
        assert status_of(state, "a_cyber") == "pending"
        os.rename(tmp_path / "models" / "moved", copy["finetuned"])
        wait_for(
            lambda: status_of(state, "a_cyber") == "applied", what="a_cyber applied once the model is back"
        )
        assert "model path(s) missing" in (tmp_path / "daemon.log").read_text()


def test_rollback_without_a_running_daemon_on_each_database(trio, tmp_path, registry_url, from_scratch_a_c):
    proc, state = run_once(tmp_path, trio, list(DIMENSIONS), "state", database_url=registry_url)
    assert proc.returncode == 0, proc.stderr
    cfg = tmp_path / "fgsn-state.toml"
    listed = fgsn("dimensions", "--json", "--config", str(cfg), timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert {d["name"] for d in json.loads(listed.stdout)} == set(DIMENSIONS)
    rolled = fgsn("rollback", "b_weapons", "--config", str(cfg))
    assert rolled.returncode == 0, rolled.stderr
    assert "queued" not in rolled.stdout  # no daemon: the command did it itself
    now = current_tensors(state)
    assert all(torch.equal(now[k], from_scratch_a_c[k]) for k in now)
    again = fgsn("rollback", "b_weapons", "--config", str(cfg))
    assert again.returncode == 2 and "no applied revision" in again.stderr


def test_an_override_that_does_not_fit_the_daemons_unit_fails_its_revision_only(trio, tmp_path):
    """A dimension's ``[fgsn] scoring = "wanda"`` under entry units (which only attribution
    scores) fails that revision with a message naming the dimension; the others are applied."""
    policy = tmp_path / "policies-state"
    policy.mkdir()
    folder = write_dimension(policy, "wanda_entries", DIMENSIONS["b_weapons"])
    with open(folder / "policy.toml", "a") as f:
        f.write('[fgsn]\nscoring = "wanda"\n')
    proc, state = run_once(tmp_path, trio, ["a_cyber"], "state", extra_params=ENTRY_PARAMS)
    assert proc.returncode == 0, proc.stderr
    assert status_of(state, "a_cyber") == "applied"
    assert status_of(state, "wanda_entries") == "failed"
    with registry(state) as reg:
        detail = reg.dimension(reg.default_lineage_id(), "wanda_entries")
    error = detail.revisions[-1].error or ""
    assert "wanda_entries: [fgsn] scoring 'wanda' scores whole neurons" in error and "entry units" in error


def test_entry_units_claim_disjointly_and_roll_back_bit_identically(trio, tmp_path):
    """Entry units are owned one by one: the version restores exactly the union of the applied
    revisions' candidate masks (a later dimension adds its new entries even inside neurons first
    claimed by an earlier one); neuron claims stay disjoint; rolling one back equals a from-scratch
    run of the others."""
    scratch, scratch_state = run_once(
        tmp_path, trio, ["a_cyber", "c_drugs"], "scratch", extra_params=ENTRY_PARAMS
    )
    assert scratch.returncode == 0, scratch.stderr
    proc, state = run_once(tmp_path, trio, list(DIMENSIONS), "state", extra_params=ENTRY_PARAMS)
    assert proc.returncode == 0, proc.stderr
    ft, al = version_tensors(str(trio["finetuned"])), version_tensors(str(trio["aligned"]))
    now = current_tensors(state)
    changed = {k: now[k] != ft[k] for k in now}
    total_changed = sum(int(m.sum()) for m in changed.values())
    assert total_changed > 0
    for k, m in changed.items():
        assert torch.equal(now[k][m], al[k][m])  # restored entries hold aligned values
    # a few entries per neuron, not whole neurons: far fewer than the claimed neurons' slices
    with registry(state) as reg:
        lineage = reg.default_lineage_id()
        claims = {
            d: [NeuronId(c.layer, c.space, c.index) for c in reg.neurons(lineage, dimension=d)]
            for d in DIMENSIONS
        }
        summaries = {r.dimension: r.summary for r in reg.revisions(lineage)}
    flat = [n for ns in claims.values() for n in ns]
    assert claims["b_weapons"] and len(flat) == len(set(flat))
    whole = sum(t.numel() for n in flat for t in neuron_slices(now, n))
    assert total_changed < whole
    assert all(s and s["entry_masks"] and s["entries"] > 0 for s in summaries.values())
    # each revision names the prompt sets it was selected with, by content
    from fgsn_daemon.core.policy import bundled_benign
    from fgsn_daemon.core.prompts import spread
    from fgsn_daemon.core.records import PromptSet

    benign = bundled_benign("train")
    with registry(state) as reg:
        params = {r.dimension: r.params for r in reg.revisions(lineage)}
    assert all(p["hard_rounds"] == 1 for p in params.values())  # the default's one hard round
    calibration = PromptSet.of(spread(benign, params["a_cyber"]["calibration_max"])).model_dump()
    assert all(s["benign"] == PromptSet.of(benign).model_dump() for s in summaries.values())
    assert all(s["calibration"] == calibration for s in summaries.values())
    assert all(s["contrast"] is None for s in summaries.values())  # ENTRY_PARAMS: contrast 0
    masks = sorted((state / "lineage-1" / "entry-masks").glob("*.safetensors"))
    assert {m.stem for m in masks} == {s["entry_masks"] for s in summaries.values()}
    from fgsn_daemon.engine.entry_masks import load_masks, union

    folder = state / "lineage-1" / "entry-masks"
    restored = union([load_masks(folder, s["entry_masks"]) for s in summaries.values()])
    # every entry of the test trio differs between aligned and fine-tuned: changed = the union
    assert all(torch.equal(restored.get(k, torch.zeros_like(m)), m) for k, m in changed.items())
    # ... which is more than each owner's entries inside its own neurons (neuron-level ownership)
    from fgsn_daemon.engine.entry_masks import load_masks_and_units, restrict_to_neurons

    per_owner = []
    for d, s in summaries.items():
        masks_d, units = load_masks_and_units(folder, s["entry_masks"])
        per_owner.append(restrict_to_neurons(masks_d, claims[d], units))
    assert sum(int(m.sum()) for m in union(per_owner).values()) < total_changed
    listed = fgsn("neurons", "--json", "--state-dir", str(state), timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == len(flat) and all(r["entries"] > 0 for r in rows)
    # every entry of the test trio differs between aligned and fine-tuned: counts = changed entries
    assert sum(r["entries"] for r in rows) == total_changed

    cfg = tmp_path / "fgsn-state.toml"
    rolled = fgsn("rollback", "b_weapons", "--config", str(cfg))
    assert rolled.returncode == 0, rolled.stderr
    after, expected = current_tensors(state), current_tensors(scratch_state)
    assert any(not torch.equal(after[k], now[k]) for k in now)  # the rollback changed something
    assert after.keys() == expected.keys()
    assert all(torch.equal(after[k], expected[k]) for k in after)
