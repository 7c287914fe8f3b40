"""Reading a DDEX ERN message file safely: hostile-XML guards, the ERN version and the 4.1.1 XSD check.

No DTD is loaded, no entity is resolved, nothing is fetched from the network; a DOCTYPE anywhere in the
prolog (the carrier of billion-laughs and XXE attacks; DDEX never needs one) is refused before parsing, and
so are files over ``ErnLimits.max_bytes`` and elements nested deeper than ``ErnLimits.max_depth``. These
raise ``ErnError(XML_UNSAFE, ...)``. ``pipelines.stages.ingest.ddex`` maps the parsed element tree to catalog rows.
"""

from __future__ import annotations

import codecs
import functools
import io
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from provenance.records import RejectionReason

# Rejection reasons the integrator adds to ``RejectionReason`` (string-valued until then).
XML_UNSAFE = "xml_unsafe"  # DOCTYPE/entities, oversize file, excessive nesting, unsupported encoding
SCHEMA_INVALID = "schema_invalid"  # not an ERN 4.x NewReleaseMessage, or fails the version's XSD
INVALID_FIELD = RejectionReason.INVALID_FIELD.value  # not well-formed XML

ERN411_XSD_ENV = "LINERNOTES_ERN411_XSD"
DEFAULT_ERN411_XSD = (Path(__file__).resolve().parents[3].parent / "shared" / "corpus" / "ddex" / "xsd"
                      / "ern411" / "release-notification.xsd")

_ERN_NAMESPACE = re.compile(r"^http://ddex\.net/xml/ern/(4\d{1,2})$")
_PROLOG_WINDOW_CHARS = 64 * 1024
_VALIDATE_LOCK = threading.Lock()  # an XMLSchema instance must not validate in two threads at once


class ErnError(ValueError):
    """A message that cannot be read. ``reason`` is a RejectionReason value or ``XML_UNSAFE``/``SCHEMA_INVALID``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ErnLimits:
    """Resource limits for one message: file size in bytes and element nesting depth.

    libxml2 itself stops at depth 256 without ``huge_tree``, so ``max_depth`` above 256 has no effect.
    """

    max_bytes: int = 50 * 1024 * 1024
    max_depth: int = 256


def read_ern_xml(path: Path, limits: ErnLimits) -> etree._Element:
    """Parse one message file with no DTD, no entities and no network, within ``limits``.

    Raises:
        ErnError: ``XML_UNSAFE`` (not a regular file, DOCTYPE, too big, too deep, unknown encoding) or
            ``INVALID_FIELD`` (not well-formed, no root element).
    """
    if not path.is_file():
        raise ErnError(XML_UNSAFE, f"{path} is not a regular file")
    size_bytes = path.stat().st_size
    if size_bytes > limits.max_bytes:
        raise ErnError(XML_UNSAFE, f"{size_bytes} bytes, over the {limits.max_bytes}-byte limit")
    with path.open("rb") as stream:
        data = stream.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:  # grew after stat
        raise ErnError(XML_UNSAFE, f"more than {limits.max_bytes} bytes")
    _check_prolog(data)
    events = etree.iterparse(io.BytesIO(data), events=("start", "end"), load_dtd=False, no_network=True,
                             resolve_entities=False, huge_tree=False, remove_comments=True, remove_pis=True)
    depth = 0
    try:
        for event, _ in events:
            depth += 1 if event == "start" else -1
            if depth > limits.max_depth:
                raise ErnError(XML_UNSAFE, f"elements nested deeper than {limits.max_depth}")
    except etree.XMLSyntaxError as err:
        if "depth" in str(err).lower():  # libxml2 (lxml 6) stops at depth 256 before the events reach the loop
            raise ErnError(XML_UNSAFE, f"elements nested too deep for the parser's limit: {err}") from err
        if any(word in str(err).lower() for word in ("amplification", "entity")):
            raise ErnError(XML_UNSAFE, f"refused by the parser's limits: {err}") from err
        raise ErnError(INVALID_FIELD, f"not well-formed XML: {err}") from err
    root = events.root
    if root is None:
        raise ErnError(INVALID_FIELD, "no root element")
    if root.getroottree().docinfo.doctype:  # the prolog scan should have caught it
        raise ErnError(XML_UNSAFE, "DOCTYPE declarations are not accepted")
    return root


def ern_version(root: etree._Element) -> str:
    """The ERN version of a ``NewReleaseMessage`` from its namespace (``.../ern/411`` → ``"4.1.1"``).

    Raises:
        ErnError: ``SCHEMA_INVALID``, the root is not an ERN 4.x ``NewReleaseMessage``.
    """
    qname = etree.QName(root)
    match = _ERN_NAMESPACE.match(qname.namespace or "")
    if not match or qname.localname != "NewReleaseMessage":
        raise ErnError(SCHEMA_INVALID, f"root is {root.tag!r}, not an ERN 4.x NewReleaseMessage")
    return ".".join(match[1])


def ern411_schema_errors(root: etree._Element, xsd_path: Path | None = None) -> list[str]:
    """Errors of a parsed message against the ERN 4.1.1 XSD, ``"line N: message"`` each; ``[]`` when valid.

    Args:
        xsd_path: ``release-notification.xsd``; default ``$LINERNOTES_ERN411_XSD`` or ``DEFAULT_ERN411_XSD``.

    Raises:
        FileNotFoundError: the XSD is not there (a config error).
    """
    return _schema_errors(root, _ern411_schema(str(_resolve_xsd(xsd_path))))


def _check_prolog(data: bytes) -> None:
    """Refuse a DOCTYPE before the root element; decodes UTF-8/16/32 (BOM or first bytes, XML 1.0 F.1)."""
    text = _decode_head(data[: _PROLOG_WINDOW_CHARS * 4])[:_PROLOG_WINDOW_CHARS]
    truncated = len(data) > _PROLOG_WINDOW_CHARS
    at = 0
    while True:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        if text.startswith("<!DOCTYPE", at) or (text.startswith("<!", at) and not text.startswith("<!--", at)):
            entities = " with ENTITY declarations" if "<!ENTITY" in text[at:] else ""
            raise ErnError(XML_UNSAFE, f"DOCTYPE{entities} refused: DDEX messages need no DTD or entities")
        for opener, closer in (("<?", "?>"), ("<!--", "-->")):
            if text.startswith(opener, at):
                end = text.find(closer, at + len(opener))
                if end < 0:
                    if truncated:
                        raise ErnError(XML_UNSAFE, f"prolog longer than {_PROLOG_WINDOW_CHARS} characters")
                    return  # unterminated: the parser reports it
                at = end + len(closer)
                break
        else:
            if at >= len(text) and truncated:
                raise ErnError(XML_UNSAFE, f"prolog longer than {_PROLOG_WINDOW_CHARS} characters")
            return  # the root element (or junk the parser reports)


def _decode_head(head: bytes) -> str:
    boms = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
            (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
    for bom, encoding in boms:
        if head.startswith(bom):
            return head[len(bom):].decode(encoding, errors="replace")
    first = head[:4]
    for marker, encoding in ((b"\x00\x00\x00<", "utf-32-be"), (b"<\x00\x00\x00", "utf-32-le"),
                             (b"\x00<\x00?", "utf-16-be"), (b"<\x00?\x00", "utf-16-le")):
        if first == marker:
            return head.decode(encoding, errors="replace")
    if first and not (first[0] == 0 or 0x09 <= first[0] < 0x80):
        raise ErnError(XML_UNSAFE, f"unsupported encoding (first bytes {first.hex()}): send UTF-8")
    return head.decode("latin-1")  # ASCII-compatible: the markup characters are ASCII


def _resolve_xsd(xsd_path: Path | None) -> Path:
    path = Path(xsd_path or os.environ.get(ERN411_XSD_ENV) or DEFAULT_ERN411_XSD)
    if not path.is_file():
        raise FileNotFoundError(f"ERN 4.1.1 XSD not found at {path}: set {ERN411_XSD_ENV} or pass xsd_path "
                                "(release-notification.xsd beside avs411.xsd)")
    return path


@functools.lru_cache(maxsize=4)
def _ern411_schema(xsd_path: str) -> etree.XMLSchema:
    parser = etree.XMLParser(load_dtd=False, no_network=True, resolve_entities=False, huge_tree=False)
    return etree.XMLSchema(etree.parse(xsd_path, parser))


def _schema_errors(root: etree._Element, schema: etree.XMLSchema) -> list[str]:
    with _VALIDATE_LOCK:
        schema.validate(root.getroottree())
        return [f"line {e.line}: {e.message}" for e in schema.error_log]
