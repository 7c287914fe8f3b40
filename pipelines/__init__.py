"""Top floor: the stage contract and runner, engines, stages, attribution, lineage, the CLI, the HTTP API."""

import logging


class _DropBeamGcpNoise(logging.Filter):
    """Beam logs a warning about optional GCP client libraries at import; it is noise for local runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def quiet_beam_import_warnings() -> None:
    root = logging.getLogger()
    if not any(isinstance(f, _DropBeamGcpNoise) for f in root.filters):
        root.addFilter(_DropBeamGcpNoise())
