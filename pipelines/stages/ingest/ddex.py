"""Reading DDEX ERN 4.x release messages (``NewReleaseMessage``) into the row dicts of a catalog delivery.

A message becomes the rows a CSV delivery would have had (``pipelines.stages.ingest.delivery``): one track row per
``SoundRecording`` (the ``TRACK_COLUMNS`` plus ``iswc``) and one ``mixture`` file row per delivered audio
file, plus the releases and deals (dataclasses, and ``records.RELEASE`` / ``records.DEAL`` rows by
``read_ern_records``). ERN 4.1, 4.1.1, 4.2 and 4.3 are read; the version
comes from the root namespace (``http://ddex.net/xml/ern/411`` → ``4.1.1``). Only 4.1.1 is checked against
its XSD: the 4.3 XSD is not in the corpus.

Shapes that differ between versions: the ISRC, PLine and ``TechnicalDetails`` sit directly in the
``SoundRecording`` in 4.1.1 and inside ``SoundRecordingEdition`` in 4.2/4.3; a delivered file is
``TechnicalDetails/File`` (4.1.1) or ``TechnicalDetails/DeliveryFile/File`` (4.3), named by ``URI`` or by
``FilePath`` + ``FileName``.

``track_id``: ``isrc-{ISRC}`` when the recording's ISRC is well formed (ISO 3901, after
``normalize_isrc``), so the same recording gets the same id in every message and re-delivery; otherwise
``ddex-{message}-{ResourceReference}`` where ``{message}`` is the message's path inside the delivery
without ``.xml``, ``/`` → ``_`` (``MessageId`` is not used: samples leave it empty or repeat it).

Licences: ``license_id`` is always ``""``. DDEX deals license streaming and downloads, never training;
the licence comes from a separate agreement (``deal_grants_training`` is False for every standard use type).

Hostile XML: no DTD is loaded, no entity is resolved, nothing is fetched from the network; a DOCTYPE
anywhere in the prolog (the carrier of billion-laughs and XXE attacks; DDEX never needs one) is refused
before parsing, and so are files over ``ErnLimits.max_bytes`` and elements nested deeper than
``ErnLimits.max_depth``. These raise ``ErnError(XML_UNSAFE, ...)`` (``pipelines.stages.ingest.ddex_xml``).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from pipelines.stages.ingest.ddex_xml import (
    DEFAULT_ERN411_XSD,
    ERN411_XSD_ENV,
    INVALID_FIELD,
    SCHEMA_INVALID,
    XML_UNSAFE,
    ErnError,
    ErnLimits,
    ern411_schema_errors,
    ern_version,
    read_ern_xml,
)
from provenance.policy import check_isrc, normalize_isrc

__all__ = ["DEFAULT_ERN411_XSD", "ERN411_XSD_ENV", "INVALID_FIELD", "SCHEMA_INVALID", "TRAINING_USE_TYPES",
           "XML_UNSAFE", "Deal", "ErnDelivery", "ErnError", "ErnLimits", "ErnMessage", "Release",
           "deal_grants_training", "deal_rows", "parse_ern", "read_ern_delivery", "read_ern_records", "release_rows",
           "validate_ern"]

# Use types that name AI training. The ERN 4.1.1 AVS UseType list has none; a licensor can only say it
# with UseType "UserDefined" and a UserDefinedValue. Compared lower case, letters and digits only.
TRAINING_USE_TYPES = frozenset({"aitraining", "aimodeltraining", "trainaimodel", "trainai",
                                "machinelearningtraining", "mltraining"})

_PLINE_PREFIX = re.compile(r"^\s*(?:\(P\)|\(p\)|℗)?\s*(?:\d{4})?\s*[,:\-]?\s*")


@dataclass(frozen=True)
class Release:
    """A ``Release`` or ``TrackRelease``; ``resource_references`` in document order."""

    reference: str
    kind: str  # "Release" | "TrackRelease"
    release_type: str
    icpn: str
    grid: str
    proprietary_ids: tuple[str, ...]
    title: str
    artist: str
    genre: str
    resource_references: tuple[str, ...]


@dataclass(frozen=True)
class Deal:
    """One ``Deal``'s terms. Dates are as written (``YYYY-MM-DD`` or a date-time); ``""`` when open."""

    release_references: tuple[str, ...]
    commercial_model_types: tuple[str, ...]
    use_types: tuple[str, ...]  # as written; "UserDefined" ones also listed in user_defined_use_types
    user_defined_use_types: tuple[str, ...]
    territories: tuple[str, ...]
    excluded_territories: tuple[str, ...]
    valid_from: str
    valid_until: str


@dataclass(frozen=True)
class ErnMessage:
    """A parsed message: rows ready for ``Delivery`` (each with ``_row``, 1-based within the message, and
    ``_message``, the message path inside the delivery), its releases and deals."""

    path: Path
    message_id: str
    version: str  # "4.1.1", "4.3", ...
    profile: str  # ReleaseProfileVersionId, e.g. "Audio"
    schema_checked: bool  # validated against an XSD (only 4.1.1 has one here)
    tracks: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    releases: list[Release] = field(default_factory=list)
    deals: list[Deal] = field(default_factory=list)
    track_ids: dict[str, str] = field(default_factory=dict)  # SoundRecording ResourceReference → track_id


@dataclass(frozen=True)
class ErnDelivery:
    """Every message of a delivery folder read: rows for ``Delivery`` (``_row`` numbered 1.. over each whole
    table), ``records.RELEASE`` and ``records.DEAL`` rows (without ``delivery_id`` and ``run_id``), and an
    error per message that could not be read (``{"message", "reason", "detail"}``; its rows are absent)."""

    tracks: list[dict[str, Any]]
    files: list[dict[str, Any]]
    releases: list[dict[str, Any]]
    deals: list[dict[str, Any]]
    errors: list[dict[str, str]]


def parse_ern(path: Path, delivery_root: Path, *, limits: ErnLimits = ErnLimits(), validate: bool = True,
              xsd_path: Path | None = None) -> ErnMessage:
    """Read one ERN 4.x message safely and map it to track and file rows.

    Args:
        path: the message file.
        delivery_root: the delivery folder; file rows' ``path`` is relative to it (the message's folder
            joined with the ``URI``, left as written so that ``check_file_row`` judges it).
        limits: file size and nesting limits.
        validate: check 4.1.1 messages against the XSD (other versions have none here).
        xsd_path: the ERN 4.1.1 ``release-notification.xsd``; default ``$LINERNOTES_ERN411_XSD`` or
            ``../shared/corpus/ddex/xsd/ern411`` beside the repository.

    Raises:
        ErnError: ``XML_UNSAFE`` (DOCTYPE, too big, too deep, unknown encoding), ``invalid_field`` (not
            well-formed), ``SCHEMA_INVALID`` (not an ERN 4.x NewReleaseMessage, or XSD errors).
        FileNotFoundError: a 4.1.1 message is to be validated and the XSD is not there (a config error).
    """
    path, delivery_root = Path(path), Path(delivery_root)
    root = read_ern_xml(path, limits)
    version = ern_version(root)
    schema_checked = False
    if validate and version == "4.1.1":
        errors = ern411_schema_errors(root, xsd_path)
        if errors:
            raise ErnError(SCHEMA_INVALID, f"{len(errors)} ERN 4.1.1 XSD error(s); first: {errors[0]}")
        schema_checked = True
    return _map_message(root, path, delivery_root, version, schema_checked)


def validate_ern(path: Path, *, limits: ErnLimits = ErnLimits(), xsd_path: Path | None = None) -> list[str]:
    """XSD errors of a message, ``"line N: message"`` each; ``[]`` when valid or when its version has no
    XSD here (only ERN 4.1.1 has one; see ``ErnMessage.schema_checked``).

    Raises:
        ErnError: the message is unsafe, not well formed, or not ERN 4.x (as ``parse_ern``).
        FileNotFoundError: the 4.1.1 XSD is missing.
    """
    root = read_ern_xml(Path(path), limits)
    if ern_version(root) != "4.1.1":
        return []
    return ern411_schema_errors(root, xsd_path)


def read_ern_delivery(root: Path, *, limits: ErnLimits = ErnLimits(), validate: bool = True,
                      xsd_path: Path | None = None
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, str]]]:
    """Read every ``*.xml`` message under a delivery folder (recursively, in sorted path order).

    Returns:
        (track rows, file rows, errors). Rows from all messages, ``_row`` renumbered 1.. over the whole
        table; an error is ``{"message": path inside the delivery, "reason": ..., "detail": ...}`` for a
        message that could not be read; its rows are absent. Duplicate ``track_id``s (the same ISRC in two
        messages) are kept for ingest to reject as ``duplicate_id``: the first in path order wins there.
        ``read_ern_records`` gives the releases and deals too.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or a 4.1.1 message is to be validated without the XSD.
    """
    records = read_ern_records(root, limits=limits, validate=validate, xsd_path=xsd_path)
    return records.tracks, records.files, records.errors


def read_ern_records(root: Path, *, limits: ErnLimits = ErnLimits(), validate: bool = True,
                     xsd_path: Path | None = None) -> ErnDelivery:
    """``read_ern_delivery`` plus every message's releases and deals as ``records.RELEASE`` and
    ``records.DEAL`` rows (``release_rows``, ``deal_rows``), in path then document order.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or a 4.1.1 message is to be validated without the XSD.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"delivery folder {root} does not exist")
    tracks: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    releases: list[dict[str, Any]] = []
    deals: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for path in sorted(root.rglob("*.xml")):
        try:
            message = parse_ern(path, root, limits=limits, validate=validate, xsd_path=xsd_path)
        except ErnError as err:
            errors.append({"message": path.relative_to(root).as_posix(), "reason": err.reason, "detail": err.detail})
            continue
        tracks.extend(message.tracks)
        files.extend(message.files)
        releases.extend(release_rows(message, root))
        deals.extend(deal_rows(message, root))
    for table in (tracks, files):
        for number, row in enumerate(table, start=1):
            row["_row"] = number
    return ErnDelivery(tracks, files, releases, deals, errors)


def release_rows(message: ErnMessage, delivery_root: Path) -> list[dict[str, Any]]:
    """A message's releases as ``records.RELEASE`` rows (``delivery_id`` and ``run_id`` left to the caller).

    ``release_id`` is ``{message path inside the delivery}#{ReleaseReference}``: unique in a delivery even
    when two messages describe the same release (the same ICPN in an ERN 4.1.1 and a 4.3 message).
    ``track_ids`` are the Tracks of the SoundRecordings it lists; other resources (images, videos) are
    only in ``resource_references``.
    """
    name = _message_name(message.path, delivery_root)
    return [{
        "release_id": f"{name}#{release.reference}",
        "release_reference": release.reference,
        "kind": release.kind,
        "release_type": release.release_type,
        "icpn": release.icpn,
        "grid": release.grid,
        "proprietary_ids": list(release.proprietary_ids),
        "title": release.title,
        "display_artist": release.artist,
        "genre": release.genre,
        "resource_references": list(release.resource_references),
        "track_ids": [message.track_ids[r] for r in release.resource_references if r in message.track_ids],
        "message": name,
        "message_id": message.message_id,
    } for release in message.releases]


def deal_rows(message: ErnMessage, delivery_root: Path) -> list[dict[str, Any]]:
    """A message's deals (one per ``DealTerms``) as ``records.DEAL`` rows (``delivery_id`` and ``run_id``
    left to the caller). Dates keep their date part (``2017-04-25T00:00:00`` → 2017-04-25); a date that is
    not ISO 8601 is null. ``grants_ai_training`` is ``deal_grants_training``: False for streaming and
    download deals, which is every deal of the real samples."""
    name = _message_name(message.path, delivery_root)
    releases = {release.reference for release in message.releases}
    return [{
        "deal_id": f"{name}#deal-{number}",
        "release_references": list(deal.release_references),
        "release_ids": [f"{name}#{r}" for r in deal.release_references if r in releases],
        "commercial_model_types": list(deal.commercial_model_types),
        "use_types": list(deal.use_types),
        "user_defined_use_types": list(deal.user_defined_use_types),
        "territories": list(deal.territories),
        "excluded_territories": list(deal.excluded_territories),
        "valid_from": _iso_date(deal.valid_from),
        "valid_until": _iso_date(deal.valid_until),
        "grants_ai_training": deal_grants_training(deal),
        "message": name,
        "message_id": message.message_id,
    } for number, deal in enumerate(message.deals, start=1)]


def _message_name(path: Path, delivery_root: Path) -> str:
    try:
        return path.resolve().relative_to(delivery_root.resolve()).as_posix()
    except ValueError:
        return path.name


def _iso_date(text: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(text.strip()[:10]) if text.strip() else None
    except ValueError:
        return None


def deal_grants_training(deal: Deal) -> bool:
    """True only when a use type explicitly names AI training (see ``TRAINING_USE_TYPES``).

    Streaming, downloads and the catch-alls (``Use``, ``AsPerContract``, ``Unknown``) never do. Territory
    and validity are not judged here; a training licence still goes through the rights policy.
    """
    names = (*deal.use_types, *deal.user_defined_use_types)
    return any(re.sub(r"[^a-z0-9]", "", name.lower()) in TRAINING_USE_TYPES for name in names)


# mapping ----------------------------------------------------------------------------------------------

def _map_message(root: etree._Element, path: Path, delivery_root: Path, version: str,
                 schema_checked: bool) -> ErnMessage:
    message_name = _message_name(path, delivery_root)
    folder = Path(message_name).parent.as_posix()
    parties = {_text(_child(p, "PartyReference")): _party_name(p) for p in _path(root, "PartyList", "Party")}
    release_elements = [r for r in _path(root, "ReleaseList", "*") if _local(r) in {"Release", "TrackRelease"}]
    releases = [_release(r) for r in release_elements]
    # genre and PLine come only from releases that list the resource (a DJ mix's sources are not its release's)
    genre_of: dict[str, str] = {}
    pline_of: dict[str, str] = {}
    for element, release in sorted(zip(release_elements, releases), key=lambda er: er[1].kind != "TrackRelease"):
        pline = _first_text(_path(element, "PLine", "PLineText"))
        for reference in release.resource_references:
            if release.genre:
                genre_of.setdefault(reference, release.genre)
            if pline:
                pline_of.setdefault(reference, pline)
    tracks, files = [], []
    track_ids: dict[str, str] = {}
    for recording in _path(root, "ResourceList", "SoundRecording"):
        reference = _text(_child(recording, "ResourceReference"))
        editions = [recording, *_children(recording, "SoundRecordingEdition")]  # 4.1.1 shape, 4.3 shape
        isrc = _first_text(e for ed in editions for e in _path(ed, "ResourceId", "ISRC"))
        normalized = normalize_isrc(isrc)
        if isrc and check_isrc(normalized) is None:
            track_id = f"isrc-{normalized}"
        else:
            track_id = f"ddex-{message_name.removesuffix('.xml').replace('/', '_')}-{reference}"
        track_ids.setdefault(reference, track_id)
        artist = _default_text(_children(recording, "DisplayArtistName")) or next(
            (parties.get(_text(r), "") for r in _path(recording, "DisplayArtist", "ArtistPartyReference")), "")
        tracks.append({
            "track_id": track_id,
            "isrc": isrc,
            "title": _default_text(_children(recording, "DisplayTitleText"))
            or _default_text(_path(recording, "DisplayTitle", "TitleText")),
            "artist": artist,
            "rights_holder": _rights_holder(recording, editions, parties, pline_of.get(reference, "")),
            "license_id": "",
            "attribution": "",
            "genre": genre_of.get(reference, ""),
            "tags": "",
            "description": "",
            "iswc": _first_text(_path(recording, "WorkId", "ISWC")),
            "_row": len(tracks) + 1,
            "_message": message_name,
        })
        for uri in _file_uris(editions):
            files.append({"track_id": track_id, "role": "mixture", "instrument": "",
                          "path": uri if folder == "." or "://" in uri else f"{folder}/{uri}",
                          "_row": len(files) + 1, "_message": message_name})
    return ErnMessage(
        path=path, message_id=_first_text(_path(root, "MessageHeader", "MessageId")), version=version,
        profile=root.get("ReleaseProfileVersionId", ""), schema_checked=schema_checked, tracks=tracks,
        files=files, releases=releases, deals=[d for rd in _path(root, "DealList", "ReleaseDeal") for d in _deals(rd)],
        track_ids=track_ids,
    )


def _rights_holder(recording: etree._Element, editions: list[etree._Element], parties: dict[str, str],
                   release_pline: str) -> str:
    """ResourceRightsController's party name, else the holder in the recording's PLine, else in the PLine of
    a release that lists it; ``""`` when none (ingest rejects it as ``missing_field``)."""
    for reference in _path(recording, "ResourceRightsController", "RightsControllerPartyReference"):
        if parties.get(_text(reference)):
            return parties[_text(reference)]
    pline = _first_text(e for ed in editions for e in _path(ed, "PLine", "PLineText")) or release_pline
    return _PLINE_PREFIX.sub("", pline, count=1).strip()


def _file_uris(editions: list[etree._Element]) -> list[str]:
    uris = []
    for edition in editions:
        for details in _children(edition, "TechnicalDetails"):
            for file_ in [*_children(details, "File"), *_path(details, "DeliveryFile", "File")]:
                uri = _text(_child(file_, "URI"))
                if not uri and _text(_child(file_, "FileName")):
                    uri = "/".join(p for p in (_text(_child(file_, "FilePath")).rstrip("/"),
                                               _text(_child(file_, "FileName"))) if p)
                if uri:
                    uris.append(uri)
    return uris


def _release(element: etree._Element) -> Release:
    ids = _child(element, "ReleaseId")
    return Release(
        reference=_text(_child(element, "ReleaseReference")),
        kind=_local(element),
        release_type=_first_text(_children(element, "ReleaseType")),
        icpn=_text(_child(ids, "ICPN")),
        grid=_text(_child(ids, "GRid")),
        proprietary_ids=tuple(_text(e) for e in _children(ids, "ProprietaryId")),
        title=_default_text(_children(element, "DisplayTitleText")),
        artist=_default_text(_children(element, "DisplayArtistName")),
        genre=_first_text(_path(element, "Genre", "GenreText")),
        resource_references=tuple(_text(e) for e in element.iter("ReleaseResourceReference")),
    )


def _deals(release_deal: etree._Element) -> list[Deal]:
    references = tuple(_text(e) for e in _children(release_deal, "DealReleaseReference"))
    deals = []
    for terms in _path(release_deal, "Deal", "DealTerms"):
        use_types = list(_children(terms, "UseType"))
        period = _child(terms, "ValidityPeriod")
        deals.append(Deal(
            release_references=references,
            commercial_model_types=tuple(_text(e) for e in _children(terms, "CommercialModelType")),
            use_types=tuple(_text(e) for e in use_types),
            user_defined_use_types=tuple(e.get("UserDefinedValue", "") for e in use_types
                                         if _text(e) == "UserDefined"),
            territories=tuple(_text(e) for e in _children(terms, "TerritoryCode")),
            excluded_territories=tuple(_text(e) for e in _children(terms, "ExcludedTerritoryCode")),
            valid_from=_text(_child(period, "StartDate")) or _text(_child(period, "StartDateTime")),
            valid_until=_text(_child(period, "EndDate")) or _text(_child(period, "EndDateTime")),
        ))
    return deals


def _party_name(party: etree._Element) -> str:
    names = _children(party, "PartyName")
    plain = [n for n in names if n.get("LanguageAndScriptCode") is None] or names
    return _first_text(_path(plain[0], "FullName")) if plain else ""


# element helpers: ERN children are unqualified; match local names so a stray default namespace still reads

def _local(element: etree._Element) -> str:
    return etree.QName(element).localname if isinstance(element.tag, str) else ""


def _children(element: etree._Element | None, name: str) -> list[etree._Element]:
    if element is None:
        return []
    return [c for c in element if isinstance(c.tag, str) and (name == "*" or _local(c) == name)]


def _child(element: etree._Element | None, name: str) -> etree._Element | None:
    found = _children(element, name)
    return found[0] if found else None


def _path(element: etree._Element | None, *names: str) -> list[etree._Element]:
    level = [element] if element is not None else []
    for name in names:
        level = [c for e in level for c in _children(e, name)]
    return level


def _text(element: etree._Element | None) -> str:
    return (element.text or "").strip() if element is not None else ""


def _first_text(elements: Any) -> str:
    return next((t for t in (_text(e) for e in elements) if t), "")


def _default_text(elements: list[etree._Element]) -> str:
    """The ``IsDefault="true"`` one, else the first without a language/script code, else the first."""
    ranked = sorted(elements, key=lambda e: (e.get("IsDefault") != "true", e.get("LanguageAndScriptCode") is not None))
    return _first_text(ranked)
