"""The ingest stage's config.

Light on purpose (pydantic and the rights policy, no Beam or audio library): the config is read by commands that run
no stage (``linernotes stages``, ``--help``) and by the Beam workers.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.config import config_dict
from provenance.policy import RunPurpose
from provenance.records import Purpose

# ``cleaning.fingerprint.NEAR_DUPLICATE_THRESHOLD``, here as a number because that module loads scipy and numba
# (tests/pipelines/test_ingest.py pins the two equal)
NEAR_DUPLICATE_THRESHOLD = 0.8


MEASURE_VERSION = "7"
"""Bump when decoding or measuring changes: it is part of every measurement cache key and of ingest's delivery
fingerprint (kept here, light, so resolving ingest's inputs imports no audio library)."""


class IngestConfig(BaseModel):
    """Configuration of one ingest run.

    Attributes:
        purpose: what the run trains for; a commercial run admits only licences that allow commercial use.
        territory: ISO 3166-1 alpha-2 code or ``Worldwide``.
        as_of: the date rights are judged at (ISO date); today when not given.
        opt_out_csv: optional CSV (``kind,value`` with kind ``rights_holder|track_id|isrc``), added to the
            opt-outs registered in the lineage store (``linernotes rights opt-out``); opt-outs always win.
        license_id: the licence agreement (a ``licenses.csv`` id) for recordings whose delivery names none,
            e.g. every recording of a DDEX delivery.
        stem_length_tolerance_samples: stems of one track may differ in length by at most this.
        max_stem_residual_db: a delivered mixture must match the sum of its delivered stems to within this
            residual (10·log10 ‖m − Σs‖²/‖m‖²); real bleed measures about −31 dB on MUSDB18.
        near_duplicate_threshold: fingerprint similarity (1 − bit error rate) above which two mixtures are
            the same recording (Haitsma & Kalker 2002).
        on_duplicate: what to do with a recording that duplicates one an earlier delivery in the workspace brought
            (found through the workspace's recording index, ``pipelines.stages.ingest.recordings``): ``reject``
            it (``duplicate_recording``, the earlier delivery's track in the detail), or ``replace``: accept it,
            linked to the earlier one in ``duplicates.parquet`` (``action`` = ``replaced``). Duplicates within
            one delivery are always rejected, the first track by id kept.
        beam_options: extra Beam pipeline options, e.g. ``["--direct_num_workers=2",
            "--direct_running_mode=multi_processing"]`` or a Flink/Spark/Dataflow runner's options
            (``infra/beam/``). An engine setting: the stage hands it to the engine
            (``pipelines.engines.EngineConfig.beam_options``), and it never enters the cache key.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    purpose: Purpose = Purpose.COMMERCIAL
    territory: str = Field(default="Worldwide", min_length=2)
    as_of: dt.date = Field(default_factory=dt.date.today)
    opt_out_csv: str | None = None
    license_id: str | None = None
    stem_length_tolerance_samples: int = Field(default=0, ge=0)
    max_stem_residual_db: float = -15.0
    near_duplicate_threshold: float = Field(default=NEAR_DUPLICATE_THRESHOLD, gt=0.5, le=1.0)
    on_duplicate: Literal["reject", "replace"] = "reject"
    beam_options: tuple[str, ...] = ()

    def run_purpose(self) -> RunPurpose:
        return RunPurpose(purpose=self.purpose, territory=self.territory, as_of=self.as_of)

    def to_dict(self) -> dict[str, Any]:
        return config_dict(self)
