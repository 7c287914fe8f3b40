"""The rights policy: does a licence admit a recording for a run's stated purpose?

A licence admits a recording when (1) it allows AI training, (2) it allows commercial use if the run is
commercial, (3) its territories cover the run's territory, and (4) the run's date lies within its validity.
An opt-out (by rights holder, track id or ISRC) always wins over any licence. Every refusal names one
``RejectionReason`` and a detail a rights team can read.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from provenance.records import Purpose, RejectionReason, canonical_json, sha256_hex

WORLDWIDE = "WORLDWIDE"
_TRUE = {"true", "yes", "y", "1", "allowed", "allow", "permitted"}
_FALSE = {"false", "no", "n", "0", "denied", "deny", "prohibited", ""}


@dataclass(frozen=True)
class RunPurpose:
    """What a run states about itself; the policy admits recordings for exactly this.

    Attributes:
        purpose: commercial or non-commercial.
        territory: ISO 3166-1 alpha-2 code (``"US"``) or ``"Worldwide"`` (needs a worldwide grant).
        as_of: the date the run's rights are judged at.
    """

    purpose: Purpose = Purpose.COMMERCIAL
    territory: str = "Worldwide"
    as_of: dt.date = field(default_factory=dt.date.today)

    def to_dict(self) -> dict[str, str]:
        return {"purpose": self.purpose.value, "territory": self.territory, "as_of": self.as_of.isoformat()}


@dataclass(frozen=True)
class Decision:
    """The policy's answer for one recording: admitted, or the reason and a readable detail."""

    admitted: bool
    reason: RejectionReason | None = None
    detail: str = ""


ADMIT = Decision(True)


def parse_bool(value: Any, name: str) -> bool:
    """``true/false/yes/no/1/0/allowed/denied`` (case-insensitive) → bool. Raises ValueError naming ``name``."""
    if isinstance(value, bool):
        return value
    text = "" if value is None else str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}: {value!r} is not a boolean (use true/false)")


def parse_territories(value: Any) -> list[str]:
    """A licence's territories → upper-case tokens. ``Worldwide`` grants everywhere; ``-XX`` excludes XX.

    Accepts a list or a string separated by ``;``, ``,`` or whitespace: ``"Worldwide; -KP"``, ``"US GB"``.
    """
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).replace(",", ";").replace(" ", ";").split(";")
    return [str(item).strip().upper() for item in items if str(item).strip()]


def covers_territory(territories: Iterable[str], territory: str) -> bool:
    """True when a licence's territories grant ``territory`` (``Worldwide`` needs a worldwide grant with no
    exclusions)."""
    tokens = [t.upper() for t in territories]
    excluded = {t[1:] for t in tokens if t.startswith("-")}
    granted = {t for t in tokens if not t.startswith("-")}
    wanted = territory.strip().upper()
    if wanted == WORLDWIDE:
        return WORLDWIDE in granted and not excluded
    if wanted in excluded:
        return False
    return WORLDWIDE in granted or wanted in granted


@dataclass(frozen=True)
class Check:
    """One step of the policy for one recording, as ``linernotes rights explain`` prints it."""

    name: str
    passed: bool
    detail: str
    reason: RejectionReason | None = None


def license_checks(license_: Mapping[str, Any], run: RunPurpose) -> list[Check]:
    """Every licence check for ``run``, in order, each passed or not: AI training, commercial use,
    territory, valid from, valid until. The one implementation behind ``check_license`` and ``explain``."""
    license_id = license_["license_id"]
    training = str(license_.get("ai_training", "")).strip().lower() in {"allowed", "allow", "true", "yes"}
    commercial_ok = run.purpose is not Purpose.COMMERCIAL or bool(license_.get("commercial_use"))
    territories = license_.get("territories") or []
    covered = covers_territory(territories, run.territory)
    valid_from, valid_until = license_.get("valid_from"), license_.get("valid_until")
    started = not valid_from or run.as_of >= valid_from
    current = not valid_until or run.as_of <= valid_until
    return [
        Check("AI training", training,
              f"licence {license_id}: ai_training={license_.get('ai_training')}" if training else
              f"licence {license_id} has ai_training={license_.get('ai_training')!r}",
              None if training else RejectionReason.LICENSE_DENIES_AI_TRAINING),
        Check("commercial use", commercial_ok,
              f"licence {license_id}: commercial_use={bool(license_.get('commercial_use'))}; "
              f"the run is {run.purpose.value}" if commercial_ok else
              f"licence {license_id} does not allow commercial use; the run is commercial",
              None if commercial_ok else RejectionReason.LICENSE_NOT_COMMERCIAL),
        Check("territory", covered,
              f"licence {license_id} covers {';'.join(territories) or 'no territory'}"
              + (f"; the run is for {run.territory}" if covered else f", not {run.territory}"),
              None if covered else RejectionReason.LICENSE_TERRITORY),
        Check("valid from", started,
              f"licence {license_id} is valid from {valid_from or 'always'}; the run is as of {run.as_of}",
              None if started else RejectionReason.LICENSE_NOT_YET_VALID),
        Check("valid until", current,
              f"licence {license_id} is valid until {valid_until or 'open-ended'}; the run is as of {run.as_of}"
              if current else f"licence {license_id} expired on {valid_until}; the run is as of {run.as_of}",
              None if current else RejectionReason.LICENSE_EXPIRED),
    ]


def check_license(license_: Mapping[str, Any] | None, run: RunPurpose) -> Decision:
    """Judge one licence record (``records.LICENSE`` fields, dates as ``datetime.date``) for ``run``: the
    first failing ``license_checks`` entry, or admitted."""
    if license_ is None:
        return Decision(False, RejectionReason.UNKNOWN_LICENSE, "no licence with that id in the delivery")
    for check in license_checks(license_, run):
        if not check.passed:
            return Decision(False, check.reason, check.detail)
    return ADMIT


@dataclass(frozen=True)
class OptOutRegistry:
    """Opt-outs that always win: by rights holder (case-insensitive), track id, or ISRC (normalised)."""

    rights_holders: frozenset[str] = frozenset()
    track_ids: frozenset[str] = frozenset()
    isrcs: frozenset[str] = frozenset()

    def content_id(self) -> str:
        """``optouts-`` + 16 hex digits of the sha256 of the normalised registry: equal ids, equal registries
        (whatever order or spelling the opt-outs were registered in)."""
        return "optouts-" + sha256_hex(canonical_json(
            [sorted(self.rights_holders), sorted(self.track_ids), sorted(self.isrcs)]))[:16]

    def merged(self, other: "OptOutRegistry") -> "OptOutRegistry":
        return OptOutRegistry(self.rights_holders | other.rights_holders, self.track_ids | other.track_ids,
                              self.isrcs | other.isrcs)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, str]]) -> "OptOutRegistry":
        """Rows with ``kind`` (``rights_holder`` | ``track_id`` | ``isrc``) and ``value``.

        Raises:
            ValueError: an unknown kind, naming the row.
        """
        holders, tracks, isrcs = set(), set(), set()
        for number, row in enumerate(rows, start=1):
            kind, value = (row.get("kind") or "").strip(), (row.get("value") or "").strip()
            if kind == "rights_holder":
                holders.add(value.casefold())
            elif kind == "track_id":
                tracks.add(value)
            elif kind == "isrc":
                isrcs.add(normalize_isrc(value))
            else:
                raise ValueError(f"opt-out row {number}: kind {kind!r} is not rights_holder, track_id or isrc")
        return cls(frozenset(holders), frozenset(tracks), frozenset(isrcs))

    def check(self, track: Mapping[str, Any]) -> Decision:
        if track.get("track_id") in self.track_ids:
            return Decision(False, RejectionReason.OPTED_OUT, f"track {track['track_id']} is opted out")
        isrc = normalize_isrc(track.get("isrc") or "")
        if isrc and isrc in self.isrcs:
            return Decision(False, RejectionReason.OPTED_OUT, f"ISRC {isrc} is opted out")
        holder = (track.get("rights_holder") or "").strip()
        if holder and holder.casefold() in self.rights_holders:
            return Decision(False, RejectionReason.OPTED_OUT, f"rights holder {holder!r} opted out")
        return ADMIT


def normalize_isrc(value: str) -> str:
    """ISRC in its 12-character form: upper case, hyphens and spaces removed (ISO 3901)."""
    return value.replace("-", "").replace(" ", "").strip().upper()


ISRC_PATTERN = r"^[A-Z]{2}[A-Z0-9]{3}[0-9]{7}$"
"""ISO 3901 in its normalised 12-character form: country, registrant, year, designation."""
_ISRC = re.compile(ISRC_PATTERN)
_ISWC = re.compile(r"^T-?(\d{3})\.?(\d{3})\.?(\d{3})-?(\d)$")


def check_isrc(value: str) -> str | None:
    """None when ``value`` (already normalised) is a well-formed ISRC, else what is wrong.

    ISO 3901: 2-letter country code, 3 alphanumeric registrant characters, 2-digit year, 5-digit designation.
    """
    if _ISRC.fullmatch(value):
        return None
    return f"isrc {value!r} is not CCXXXYYNNNNN (ISO 3901: country, registrant, year, designation)"


def normalize_iswc(value: str) -> str:
    """ISWC in its display form ``T-DDD.DDD.DDD-C`` when it parses, else stripped upper case."""
    text = value.strip().upper().replace(" ", "")
    match = _ISWC.fullmatch(text)
    return f"T-{match[1]}.{match[2]}.{match[3]}-{match[4]}" if match else text


def check_iswc(value: str) -> str | None:
    """None when ``value`` is a valid ISWC, else what is wrong.

    ISO 15707: ``T`` + 9 digits + a check digit C with (1 + Σ_{i=1..9} i·d_i + C) ≡ 0 (mod 10).
    """
    match = _ISWC.fullmatch(value.strip().upper().replace(" ", ""))
    if not match:
        return f"iswc {value!r} is not T-DDD.DDD.DDD-C"
    digits = [int(ch) for ch in match[1] + match[2] + match[3]]
    expected = (10 - (1 + sum(i * d for i, d in enumerate(digits, start=1))) % 10) % 10
    if int(match[4]) != expected:
        return f"iswc {value!r} has check digit {match[4]}, expected {expected}"
    return None


def explain(track: Mapping[str, Any], licenses: Mapping[str, Mapping[str, Any]], run: RunPurpose,
            opt_outs: OptOutRegistry | None = None) -> list[Check]:
    """Every check of the policy for ``track`` in order, each passed or not (not only the first failure)."""
    opted = (opt_outs or OptOutRegistry()).check(track)
    checks = [Check("opt-out registry", opted.admitted,
                    "no opt-out names this track, its ISRC or its rights holder" if opted.admitted else opted.detail,
                    opted.reason)]
    license_ = licenses.get(track.get("license_id") or "")
    if license_ is None:
        return checks + [Check("licence", False, f"no licence {track.get('license_id')!r} in the delivery",
                               RejectionReason.UNKNOWN_LICENSE)]
    return checks + license_checks(license_, run)


def decide(track: Mapping[str, Any], licenses: Mapping[str, Mapping[str, Any]], run: RunPurpose,
           opt_outs: OptOutRegistry | None = None) -> Decision:
    """The policy for one track: opt-outs first (they always win), then its licence."""
    if opt_outs is not None:
        decision = opt_outs.check(track)
        if not decision.admitted:
            return decision
    return check_license(licenses.get(track.get("license_id") or ""), run)
