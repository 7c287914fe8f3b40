"""The rights policy: does a licence admit a recording for a run's stated purpose?

A licence admits a recording when (1) it allows AI training, (2) it allows commercial use if the run is
commercial, (3) its territories cover the run's territory, and (4) the run's date lies within its validity.
An opt-out (by rights holder, track id or ISRC) always wins over any licence. Every refusal names one
``RejectionReason`` and a detail a rights team can read.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from provenance.records import Purpose, RejectionReason

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


def check_license(license_: Mapping[str, Any] | None, run: RunPurpose) -> Decision:
    """Judge one licence record (``records.LICENSE`` fields, dates as ``datetime.date``) for ``run``."""
    if license_ is None:
        return Decision(False, RejectionReason.UNKNOWN_LICENSE, "no licence with that id in the delivery")
    license_id = license_["license_id"]
    if str(license_.get("ai_training", "")).strip().lower() not in {"allowed", "allow", "true", "yes"}:
        return Decision(False, RejectionReason.LICENSE_DENIES_AI_TRAINING,
                        f"licence {license_id} has ai_training={license_.get('ai_training')!r}")
    if run.purpose is Purpose.COMMERCIAL and not license_.get("commercial_use"):
        return Decision(False, RejectionReason.LICENSE_NOT_COMMERCIAL,
                        f"licence {license_id} does not allow commercial use; the run is commercial")
    territories = license_.get("territories") or []
    if not covers_territory(territories, run.territory):
        return Decision(False, RejectionReason.LICENSE_TERRITORY,
                        f"licence {license_id} covers {';'.join(territories) or 'no territory'}, "
                        f"not {run.territory}")
    valid_from, valid_until = license_.get("valid_from"), license_.get("valid_until")
    if valid_from and run.as_of < valid_from:
        return Decision(False, RejectionReason.LICENSE_NOT_YET_VALID,
                        f"licence {license_id} is valid from {valid_from}; the run is as of {run.as_of}")
    if valid_until and run.as_of > valid_until:
        return Decision(False, RejectionReason.LICENSE_EXPIRED,
                        f"licence {license_id} expired on {valid_until}; the run is as of {run.as_of}")
    return ADMIT


@dataclass(frozen=True)
class OptOutRegistry:
    """Opt-outs that always win: by rights holder (case-insensitive), track id, or ISRC (normalised)."""

    rights_holders: frozenset[str] = frozenset()
    track_ids: frozenset[str] = frozenset()
    isrcs: frozenset[str] = frozenset()

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


def decide(track: Mapping[str, Any], licenses: Mapping[str, Mapping[str, Any]], run: RunPurpose,
           opt_outs: OptOutRegistry | None = None) -> Decision:
    """The policy for one track: opt-outs first (they always win), then its licence."""
    if opt_outs is not None:
        decision = opt_outs.check(track)
        if not decision.admitted:
            return decision
    return check_license(licenses.get(track.get("license_id") or ""), run)
