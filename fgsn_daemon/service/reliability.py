"""Crash campaigns: the daemon, run as a real subprocess over a fixed queue of policy changes, is
SIGKILLed at seeded random moments (or at a named fault point, see ``faults``) and restarted until
the queue drains; after every kill the invariants are checked:

1. the registry is consistent: every active claim belongs to an applied revision, no neuron has two
   active owners, every version row points at a complete folder (manifest), and after a clean run
   no job is left running;
2. ``current`` is a complete version the registry knows, bit-equal to a state the uninterrupted run
   passes through in this stage (the state before the stage or a version it publishes), never
   going backwards; at the end of each stage it loads with transformers;
3. the end state (weights and registry contents, ignoring ids and timestamps) is bit-identical to
   that of an uninterrupted run of the same inputs;
4. the policy folder is never modified, and every dimension in it ends applied, rolled back or
   recorded as failed.

Used by ``tests/test_crash_campaign.py`` (short form) and ``benchmarks/crash_campaign.py`` (long)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.engine import make_url

from fgsn_daemon.core.faults import FAULT_ENV
from fgsn_daemon.service.integrity import check_version
from fgsn_daemon.service.registry import Registry, current_revision, make_engine
from fgsn_daemon.service.registry.models import JobState, RevisionStatus

RANDOM = "random"  # a plan entry: kill at a random moment instead of at a named point
MAX_CLEAN_RUNS = 3  # uninterrupted runs a stage may need after its kills before it counts as stuck
RUNNING_STATES = (JobState.SCORING, JobState.EDITING, JobState.PUBLISHING)
_FINISHED = (JobState.DONE, JobState.FAILED, JobState.DISCARDED)
FINAL_STATUSES = (RevisionStatus.APPLIED, RevisionStatus.FAILED, RevisionStatus.ROLLED_BACK)
ACTIVATION_PARAMS = 'preset = "activation"\nq = 50\np = 10\nbatch_size = 8\nmax_length = 32\n'


@dataclass(frozen=True)
class Stage:
    """The policy folder's content during one stage (dimension -> harmful prompts), and optionally
    a dimension rolled back with ``fgsn rollback`` once the folder is served."""

    label: str
    dimensions: Mapping[str, Sequence[str]]
    rollback: str | None = None


def default_stages() -> list[Stage]:
    """Several dimensions, a changed revision and a rollback, in three stages."""
    a = ["hack wifi", "phish bank account", "steal bank account money", "hack bank account"]
    a2 = ["hack wifi", "phish bank account", "how do i hack wifi", "steal bank account"]
    b = ["build weapon", "how do i make a bomb", "make bomb", "how do i build weapon"]
    c = ["buy drugs", "how do i buy drugs", "steal money buy drugs", "make drugs"]
    return [
        Stage("apply a, b", {"a_cyber": a, "b_weapons": b}),
        Stage("add c, change a", {"a_cyber": a2, "b_weapons": b, "c_drugs": c}),
        Stage("roll back b", {"a_cyber": a2, "b_weapons": b, "c_drugs": c}, rollback="b_weapons"),
    ]


# ------------------------------------------------------------------------------- set-up


def write_policies(policy_dir: Path, dimensions: Mapping[str, Sequence[str]]) -> None:
    """Make ``policy_dir`` hold ``dimensions``: new or changed folders are written under a hidden
    name and renamed in (a changed one swaps with its old folder), as a careful user would."""
    policy_dir.mkdir(parents=True, exist_ok=True)
    for name, prompts in dimensions.items():
        body = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
        final = policy_dir / name
        if (final / "harmful.jsonl").is_file() and (final / "harmful.jsonl").read_text() == body:
            continue
        tmp = policy_dir / f".incoming-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "policy.toml").write_text(
            f'description = "crash campaign dimension {name}"\nsource = "tests"\nlicense = "MIT"\n'
        )
        (tmp / "harmful.jsonl").write_text(body)
        if final.exists():
            old = policy_dir / f".old-{name}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)


def write_config(
    path: Path,
    trio: Mapping[str, Path],
    policy_dir: Path,
    state_dir: Path,
    database_url: str | None = None,
    params: str = ACTIVATION_PARAMS,
) -> Path:
    db = f'database_url = "{database_url}"\n' if database_url else ""
    path.write_text(
        db + f'base = "{trio["base"]}"\naligned = "{trio["aligned"]}"\nfinetuned = "{trio["finetuned"]}"\n'
        f'policy_dir = "{policy_dir}"\nstate_dir = "{state_dir}"\ndevice = "cpu"\n'
        f"settle_s = 0.05\nscan_interval_s = 0.3\n[params]\n{params}"
    )
    return path


def folder_digest(folder: Path) -> str:
    """Names, bytes and modification times of every file under ``folder``."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(folder)}\0{p.stat().st_mtime_ns}\0".encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def weights_digest(folder: Path) -> str:
    """Every tensor's name, dtype, shape and bytes, independent of how they are sharded."""
    from safetensors import safe_open

    h = hashlib.sha256()
    tensors: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[name] = st.get_tensor(name)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------- state


@dataclass
class Observed:
    """What the registry and the state folder hold, ids and timestamps left out."""

    current: str | None  # weights digest of the folder `current` points at
    current_name: str | None
    summary: dict[str, Any]
    unfinished: list[str]  # "kind state" of unfinished jobs
    problems: list[str]


def open_registry(url: str) -> Registry:
    return Registry.open(url, read_only=True)


def registry_exists(url: str) -> bool:
    """Whether the database at ``url`` holds a migrated registry (without creating anything)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        return False
    engine = make_engine(url, read_only=True)
    try:
        return current_revision(engine) is not None
    finally:
        engine.dispose()


def observe(state_dir: Path, url: str, *, after_recovery: bool) -> Observed:
    """The state after a run (killed or not), with every violation of invariant 1 and the
    completeness half of invariant 2 listed in ``problems``."""
    problems: list[str] = []
    if not registry_exists(url):  # killed before the first migration committed
        return Observed(None, None, {}, [], [])
    with open_registry(url) as reg:
        lineage = reg.default_lineage_id()
        if lineage is None:
            return Observed(None, None, {}, [], [])
        link = state_dir / f"lineage-{lineage}" / "current"
        current_folder = link.resolve() if link.is_symlink() else None
        revisions = reg.revisions(lineage)
        by_id = {r.id: r for r in revisions}
        claims = reg.neurons(lineage)
        versions = reg.versions(lineage)
        jobs = reg.jobs(lineage)
        registry_current = reg.current_version(lineage)
    # 1. registry consistency
    owners = Counter((c.layer, c.space, c.index) for c in claims)
    twice = [n for n, k in owners.items() if k > 1]
    if twice:
        problems.append(f"{len(twice)} neurons have two active owners, e.g. {twice[0]}")
    stray = {c.dimension for c in claims if by_id[c.revision_id].status != RevisionStatus.APPLIED}
    if stray:
        problems.append(f"active claims of revisions that are not applied: {sorted(stray)}")
    for v in versions:
        fatal = [p for p in check_version(Path(v.path)) if p.fatal]
        if fatal:
            problems.append(f"version {v.number} ({v.path}) is not complete: {fatal[0]}")
    unfinished = [f"{j.kind.value} {j.state.value}" for j in jobs if j.state not in _FINISHED]
    if after_recovery:
        running = [u for u in unfinished if u.split()[1] in {s.value for s in RUNNING_STATES}]
        if unfinished:
            problems.append(f"jobs left unfinished after a clean run: {running or unfinished}")
    # 2. `current` is complete and known
    known = {Path(v.path).name for v in versions}
    name = None
    digest = None
    if current_folder is not None:
        name = current_folder.name
        if name not in known:
            problems.append(f"current points at {name}, which the registry does not know")
        fatal = [p for p in check_version(current_folder) if p.fatal]
        if fatal:
            problems.append(f"current ({name}) is not complete: {fatal[0]}")
        else:
            digest = weights_digest(current_folder)
        if after_recovery and registry_current is not None and Path(registry_current.path).name != name:
            problems.append(f"current points at {name} but the registry's current is {registry_current.path}")
    elif registry_current is not None:
        problems.append("the registry has a current version but there is no `current` link")
    summary = {
        "revisions": sorted(
            (
                r.dimension,
                r.number,
                r.status.value,
                r.content_fingerprint,
                r.selected,
                r.skipped,
                r.active_claims,
            )
            for r in revisions
        ),
        "claims": sorted((c.layer, c.space, c.index, c.dimension, c.revision_number) for c in claims),
        "jobs": [
            (j.kind.value, j.dimension or (j.details or {}).get("dimension"), j.state.value, j.error)
            for j in sorted(jobs, key=lambda j: j.id)
        ],
        "versions": [sorted(v.revisions) for v in sorted(versions, key=lambda v: v.number)],
        "current": sorted(registry_current.revisions) if registry_current else None,
    }
    return Observed(digest, name, summary, unfinished, problems)


def version_digests(state_dir: Path, url: str) -> list[str]:
    """Weights digests of every committed version, oldest first."""
    with open_registry(url) as reg:
        lineage = reg.default_lineage_id()
        versions = sorted(reg.versions(lineage), key=lambda v: v.number) if lineage else []
    return [weights_digest(Path(v.path)) for v in versions]


def _append(log: Path, run_log: Path) -> None:
    with open(log, "ab") as out:
        out.write(run_log.read_bytes())


def loads_with_transformers(folder: Path) -> str | None:
    """None when ``folder`` loads as a causal LM, else the error."""
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM.from_pretrained(str(folder))
    except Exception as exc:  # any failure to load is the finding
        return f"{type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------------------- the runs


@dataclass
class Kill:
    stage: str
    attempt: int
    delay_s: float
    phase: str
    problems: list[str]


@dataclass
class Report:
    kills: list[Kill] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # end-of-stage and end-state violations
    runs: int = 0
    seconds: float = 0.0

    @property
    def failures(self) -> int:
        return len(self.problems) + sum(1 for k in self.kills if k.problems)

    def phases(self) -> Counter[str]:
        return Counter(k.phase for k in self.kills)


@dataclass
class Reference:
    """The uninterrupted run: per stage, the states `current` may show, and the end state."""

    allowed: list[list[str]]
    end: Observed
    timings: list[tuple[float, float]]  # per stage: seconds to the first log line, seconds in all


class Campaign:
    def __init__(
        self,
        root: Path,
        trio: Mapping[str, Path],
        stages: Sequence[Stage] | None = None,
        database_url: Callable[[str], str] | None = None,
        params: str = ACTIVATION_PARAMS,
        log: Callable[[str], None] = lambda msg: None,
    ) -> None:
        self.root, self.trio = root, trio
        self.stages = list(stages or default_stages())
        self.database_url = database_url  # state name -> URL (default: SQLite in the state folder)
        self.params = params
        self.log = log

    def paths(self, name: str) -> tuple[Path, Path, Path, str]:
        policy, state = self.root / f"policies-{name}", self.root / f"state-{name}"
        url = self.database_url(name) if self.database_url else f"sqlite:///{state}/registry.db"
        cfg = write_config(
            self.root / f"fgsn-{name}.toml",
            self.trio,
            policy,
            state,
            url if self.database_url else None,
            self.params,
        )
        return policy, state, cfg, url

    def command(self, stage: Stage, cfg: Path, state: Path, url: str) -> list[str]:
        """`fgsn rollback` until the rollback job exists, then `fgsn run --once` (which resumes it)."""
        base = [sys.executable, "-m", "fgsn_daemon.cli.main"]
        if stage.rollback and not self._rollback_started(state, url, stage.rollback):
            return [*base, "rollback", stage.rollback, "--config", str(cfg)]
        return [*base, "run", "--once", "--config", str(cfg)]

    @staticmethod
    def _rollback_started(state: Path, url: str, dimension: str) -> bool:
        if not registry_exists(url):
            return False
        with open_registry(url) as reg:
            lineage = reg.default_lineage_id()
            return lineage is not None and any(
                j.kind.value == "rollback" and (j.details or {}).get("dimension") == dimension
                for j in reg.jobs(lineage)
            )

    def _stage_done(self, stage: Stage, state: Path, url: str) -> bool:
        if not stage.rollback:
            return True
        with open_registry(url) as reg:
            lineage = reg.default_lineage_id()
            detail = reg.dimension(lineage, stage.rollback) if lineage else None
        return bool(detail and detail.revisions and detail.revisions[-1].status == RevisionStatus.ROLLED_BACK)

    def _spawn(
        self, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        base = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
        with open(log_path, "wb") as log:
            return subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**base, "HF_HUB_OFFLINE": "1", **(env or {})},
            )

    def _timed_run(self, argv: list[str], log_path: Path) -> tuple[int, float, float]:
        """(exit code, seconds to the first log line, seconds in all) of one uninterrupted run."""
        t0 = time.monotonic()
        proc = self._spawn(argv, log_path)
        first = _wait_first_log(proc, log_path, 600.0)
        code = proc.wait()
        total = time.monotonic() - t0
        return code, (first if first is not None else total) - t0, total

    def reference(self) -> Reference:
        """Run every stage without interruption; record the states `current` may show."""
        policy, state, cfg, url = self.paths("reference")
        allowed: list[list[str]] = []
        timings: list[tuple[float, float]] = []
        start_state: list[str] = []
        for stage in self.stages:
            write_policies(policy, stage.dimensions)
            time.sleep(0.1)  # past the settle period
            to_first, total = 0.0, 0.0
            for _ in range(MAX_CLEAN_RUNS):
                code, first, seconds = self._timed_run(
                    self.command(stage, cfg, state, url), self.root / "reference-run.log"
                )
                _append(self.root / "reference.log", self.root / "reference-run.log")
                if code != 0:
                    raise RuntimeError(
                        f"the uninterrupted run failed in {stage.label!r}; see {self.root}/reference.log"
                    )
                to_first, total = max(to_first, first), max(total, seconds)
                if self._stage_done(stage, state, url):
                    break
            else:
                raise RuntimeError(f"the uninterrupted run did not finish {stage.label!r}")
            timings.append((to_first, total))
            digests = version_digests(state, url)
            new = [d for d in digests if d not in start_state]
            allowed.append(list(dict.fromkeys(start_state[-1:] + new)))
            start_state = digests
        end = observe(state, url, after_recovery=True)
        if end.problems:
            raise RuntimeError(f"the uninterrupted run violates the invariants: {end.problems}")
        return Reference(allowed, end, timings)

    def run(
        self, kills: int, seed: int, reference: Reference | None = None, name: str = "campaign"
    ) -> Report:
        """Kill ``kills`` times in all at random moments: rounds of every stage (each round in a
        fresh state folder), a share of the round's kills in each stage."""
        ref = reference or self.reference()
        rng = random.Random(seed)
        report = Report()
        t_start = time.monotonic()
        n = len(self.stages)
        per_round = max(n, min(kills, 3 * n))
        r = 0
        while len(report.kills) < kills:
            r += 1
            k = min(per_round, kills - len(report.kills))
            plan = [[RANDOM] * (k // n + (s < k % n)) for s in range(n)]
            self._round(f"{name}-{r}", ref, plan, report, rng)
        report.seconds = time.monotonic() - t_start
        return report

    def run_points(
        self, plan: Sequence[Sequence[str]], reference: Reference | None = None, name: str = "points"
    ) -> Report:
        """Kill at named fault points: ``plan[s]`` lists, for stage s, the point each successive
        run is armed with (one kill per run, restarting in between), then the stage drains."""
        ref = reference or self.reference()
        report = Report()
        t_start = time.monotonic()
        self._round(name, ref, plan, report, random.Random(0))
        report.seconds = time.monotonic() - t_start
        return report

    def _round(
        self,
        name: str,
        ref: Reference,
        plan: Sequence[Sequence[str]],
        report: Report,
        rng: random.Random,
    ) -> None:
        policy, state, cfg, url = self.paths(name)
        for s, stage in enumerate(self.stages):
            write_policies(policy, stage.dimensions)
            policy_before = folder_digest(policy)
            allowed, last_index = ref.allowed[s], 0
            strikes, attempt = list(plan[s]) if s < len(plan) else [], 0
            while True:
                attempt += 1
                run_log = self.root / f"{name}-run.log"
                strike = strikes.pop(0) if strikes else None
                argv = self.command(stage, cfg, state, url)
                report.runs += 1
                t0 = time.monotonic()
                if strike is None or strike == RANDOM:
                    proc = self._spawn(argv, run_log)
                    if strike == RANDOM:
                        self._kill(proc, run_log, ref.timings[s], rng)
                else:
                    proc = self._spawn(argv, run_log, {FAULT_ENV: strike})
                code = proc.wait()
                delay = time.monotonic() - t0
                _append(self.root / f"{name}.log", run_log)
                if strike is not None and strike != RANDOM and code != -signal.SIGKILL:
                    report.problems.append(
                        f"{name}, {stage.label}: fault point {strike} was not reached (exit {code})"
                    )
                if code == -signal.SIGKILL and strike is not None:
                    seen = observe(state, url, after_recovery=False)
                    problems = list(seen.problems)
                    if folder_digest(policy) != policy_before:
                        problems.append("the policy folder was modified")
                    if seen.current is None and s > 0:
                        problems.append("no current version after the first stage")
                    elif seen.current is not None and seen.current not in allowed:
                        problems.append(f"current ({seen.current_name}) is no state of the uninterrupted run")
                    elif seen.current is not None and allowed.index(seen.current) < last_index:
                        problems.append(f"current ({seen.current_name}) went back to an earlier state")
                    elif seen.current is not None:
                        last_index = allowed.index(seen.current)
                    phase = strike if strike != RANDOM else _phase(seen, state, _last_message(run_log))
                    report.kills.append(Kill(stage.label, attempt, delay, phase, problems))
                    self.log(
                        f"kill {len(report.kills)} ({name}, {stage.label}, +{delay:.2f} s): {phase}"
                        + (f" — {problems}" if problems else "")
                    )
                    continue
                if code != 0:
                    report.problems.append(f"{name}, {stage.label}: a run exited {code}; see {name}.log")
                    break
                if self._stage_done(stage, state, url) and not strikes:
                    break
                if not strikes and attempt > len(plan[s] if s < len(plan) else []) + MAX_CLEAN_RUNS:
                    report.problems.append(
                        f"{name}, {stage.label}: not drained after {MAX_CLEAN_RUNS} uninterrupted runs"
                    )
                    break
            report.problems += [
                f"{name}, {p}"
                for p in self._end_of_stage(stage, state, url, policy, policy_before, allowed[-1])
            ]
        end = observe(state, url, after_recovery=True)
        if end.summary != ref.end.summary:
            diff = sorted(k for k in end.summary if end.summary[k] != ref.end.summary.get(k))
            report.problems.append(
                f"{name}: the end state's registry differs from the uninterrupted run in {diff}"
            )
        if end.current != ref.end.current:
            report.problems.append(f"{name}: the end state's weights differ from the uninterrupted run")

    @staticmethod
    def _kill(
        proc: subprocess.Popen[bytes], run_log: Path, timing: tuple[float, float], rng: random.Random
    ) -> None:
        """SIGKILL ``proc`` at a random moment (it may finish first).
        A third of the kills are drawn over the whole run (imports, lock, migrations, recovery);
        the rest after its first log line, over what the uninterrupted run took from there (the
        jobs, which on a tiny model take a fraction of the start-up)."""
        t0 = time.monotonic()
        to_first, total = timing
        if rng.random() < 1 / 3:
            target = t0 + rng.uniform(0, total + 0.5)
        else:
            first = _wait_first_log(proc, run_log, total + 30)
            target = (first or time.monotonic()) + rng.uniform(0, max(0.2, total - to_first + 0.3))
        while proc.poll() is None and time.monotonic() < target:
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)

    def _end_of_stage(
        self, stage: Stage, state: Path, url: str, policy: Path, policy_before: str, expected: str
    ) -> list[str]:
        seen = observe(state, url, after_recovery=True)
        out = [f"{stage.label}: {p}" for p in seen.problems]
        if folder_digest(policy) != policy_before:
            out.append(f"{stage.label}: the policy folder was modified")
        if seen.current != expected:
            out.append(f"{stage.label}: current differs from the uninterrupted run's state at this point")
        with open_registry(url) as reg:
            lineage = reg.default_lineage_id()
            latest = {d.name: d.latest for d in reg.dimensions(lineage)} if lineage else {}
        for name in stage.dimensions:
            rev = latest.get(name)
            if rev is None or rev.status not in FINAL_STATUSES:
                out.append(f"{stage.label}: dimension {name} is {rev.status.value if rev else 'unknown'}")
        if seen.current_name is not None:
            error = loads_with_transformers((state / "current").resolve())
            if error:
                out.append(f"{stage.label}: current does not load with transformers: {error}")
        return out


LOG_MARKERS = (b'"logger": "fgsn', b" INFO ", b" WARNING ", b" ERROR ")


def _wait_first_log(proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> float | None:
    """The monotonic time the process wrote its first log line (None: it exited or timed out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            data = log_path.read_bytes()
        except FileNotFoundError:
            data = b""
        if any(m in data for m in LOG_MARKERS):
            return time.monotonic()
        time.sleep(0.01)
    return None


def _last_message(log_path: Path) -> str:
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return str(json.loads(line).get("message", ""))
            except ValueError:
                continue
        if any(m.decode() in line for m in LOG_MARKERS[1:]):
            return line.split(" ", 3)[-1]
    return ""


PHASES = (  # the last log message before the kill -> where the run was
    ("rolled back", "after a rollback"),
    ("applied ", "after an apply"),
    ("writing version", "building / committing / publishing a version"),
    ("scoring", "scoring a dimension"),
    ("queued", "scanning the policy folder"),
    ("daemon ready", "scanning the policy folder"),
    ("recovered", "recovery"),
    ("forward pass", "start-up: layer curve"),
    ("loading", "start-up: loading models"),
)


def _phase(seen: Observed, state: Path, last_message: str) -> str:
    """Where the kill landed, from the last log line, the registry and the disk."""
    where = next((label for key, label in PHASES if key in last_message), None)
    if where is None:
        where = "start-up: imports, lock, migrations" if not last_message else "start-up"
    staging = any(p.name.startswith(".staging-") for p in state.glob("lineage-*/versions/*"))
    running = [u for u in seen.unfinished if not u.endswith("pending")]
    return where + (f" [{running[0]}]" if running else "") + (" [staging left]" if staging else "")
