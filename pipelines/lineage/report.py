"""``linernotes report GENERATION_ID``: one HTML page a rights team can open and listen to.

``generations/<id>/report.html`` with its files in ``generations/<id>/report_files/`` (relative links, so the
folder can be copied or served as it is):

- a player for the generated track (``generation.wav`` beside the report) and its log-mel image;
- for each of the top-k training segments of the stored attribution: rank, score, share, track, rights
  holder, licence and attribution text, a player (the segment's audio cut from the dataset's shard, as WAV)
  and its log-mel image;
- the rights holders' shares as a bar chart (PNG) and a table; the tracks' shares as a table;
- or, when the generation had nothing to attribute (silence, or scores that cannot be shared: its ``attribute`` Run
  stored no rows and said why), that reason in place of the shares and segments: no one is credited.

The attribution is read from the lineage store (``generate`` stores it; ``linernotes attribute`` or the API
store others); the method is a parameter. Mel images and the chart are drawn with matplotlib (Agg).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cleaning.audio import read_audio, to_mono, write_audio
from cleaning.mel import MelConfig, log_mel
from pipelines.lineage.walk import find_no_attribution, known_tracks, summarize_attribution
from provenance import records
from provenance.store import LineageStore
from provenance.workspace import Workspace

REPORT_NAME = "report.html"
FILES_DIR = "report_files"


class ReportError(ValueError):
    """The generation, its audio or its attribution is not there to report on."""


def report_path(workspace: Workspace, generation_id: str) -> Path:
    """Where the report of ``generation_id`` is written."""
    return workspace.generation_dir(generation_id) / REPORT_NAME


def build_report(workspace: Workspace, generation_id: str, method: str = "embedding", top_k: int = 5) -> dict[str, Any]:
    """Write the HTML report of a generation; returns ``{"report": path, "files": [...], ...}``.

    Args:
        method: whose stored attribution to show (``embedding``, ``dtrak``, ``unlearning``).
        top_k: training segments with a player and a mel image (the tables list every stored segment).

    A generation whose ``method`` attribution found nothing to attribute (``find_no_attribution``) gets a report
    that says so, with the reason (``no_attribution`` in the returned dict), and no shares.

    Raises:
        ReportError: no such generation, its WAV is missing, or no ``method`` attribution is stored for it (and
            none was found to have nothing to attribute).
    """
    store = LineageStore(workspace.store_url)
    try:
        generation = store.get_generation(generation_id)
        if generation is None:
            raise ReportError(f"no generation {generation_id!r} in the lineage store")
        rows = store.get_attributions(generation_id, method)
        if rows:
            attribution = {**summarize_attribution(rows, known_tracks(workspace, store)), "no_attribution": None}
        elif (why := find_no_attribution(store, generation_id, method)) is not None:
            attribution = {"dataset_id": why["dataset_id"], "run_id": why["run_id"], "segments": [], "tracks": [],
                           "rights_holders": [], "no_attribution": {"reason": why["reason"], "detail": why["detail"]}}
        else:
            methods = sorted({r["method"] for r in store.get_attributions(generation_id)})
            have = f"stored: {', '.join(methods)}" if methods else "none stored"
            raise ReportError(f"generation {generation_id} has no {method} attribution ({have})")
        with store.run("report", {"generation_id": generation_id, "method": method, "top_k": top_k}) as run:
            payload = _write(workspace, generation, attribution, method, top_k)
            run.counts, run.outputs = {"segments": payload["segments"], "players": payload["players"]}, \
                {"report": payload["report"]}
        return {"run_id": run.run_id, **payload}
    finally:
        store.close()


def _write(workspace: Workspace, generation: dict[str, Any], attribution: dict[str, Any], method: str,
           top_k: int) -> dict[str, Any]:
    generation_id = generation["generation_id"]
    gen_dir = workspace.generation_dir(generation_id)
    wav = Path(generation["uri"])
    if not wav.is_file():
        raise ReportError(f"generation {generation_id}'s audio {wav} is missing")
    files_tmp = gen_dir / f".{FILES_DIR}.tmp"
    shutil.rmtree(files_tmp, ignore_errors=True)
    files_tmp.mkdir(parents=True)

    if wav.resolve().parent == gen_dir.resolve():
        generation_src = wav.name
    else:
        shutil.copyfile(wav, files_tmp / "generation.wav")
        generation_src = f"{FILES_DIR}/generation.wav"
    audio, rate = read_audio(wav)
    _mel_png(audio, rate, files_tmp / "generation-mel.png", f"generation {generation_id}")

    top = attribution["segments"][:top_k]
    segment_audio = _segment_audio(workspace, attribution["dataset_id"], [s["segment_id"] for s in top])
    track_meta = {t["track_id"]: t for t in attribution["tracks"]}
    segments = []
    for segment in attribution["segments"]:
        entry = {**segment, **{k: track_meta.get(segment["track_id"], {}).get(k)
                               for k in ("title", "license_id", "license_name", "attribution")}}
        found = segment_audio.get(segment["segment_id"])
        if segment in top and found is not None:
            stem = f"segment-{segment['rank']:03d}"
            write_audio(files_tmp / f"{stem}.wav", found[0], found[1], subtype="PCM_16")
            _mel_png(found[0], found[1], files_tmp / f"{stem}-mel.png", segment["segment_id"])
            entry["audio"], entry["mel"] = f"{FILES_DIR}/{stem}.wav", f"{FILES_DIR}/{stem}-mel.png"
        elif segment in top:
            entry["missing"] = f"audio unavailable: dataset {attribution['dataset_id']} or its shard is gone"
        segments.append(entry)
    if attribution["rights_holders"]:
        _shares_png(attribution["rights_holders"], files_tmp / "rights-holder-shares.png")

    html = _render(generation=generation, method=method, attribution=attribution, segments=segments,
                   generation_src=generation_src, top_k=top_k,
                   created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"))
    files_dir = gen_dir / FILES_DIR
    shutil.rmtree(files_dir, ignore_errors=True)
    os.replace(files_tmp, files_dir)
    path = records.write_text(html, report_path(workspace, generation_id))
    return {"generation_id": generation_id, "method": method, "report": str(path),
            "segments": len(segments), "players": 1 + sum(1 for s in segments if s.get("audio")),
            "files": sorted(str(p) for p in files_dir.iterdir()), "no_attribution": attribution["no_attribution"]}


def _segment_audio(workspace: Workspace, dataset_id: str | None, segment_ids: list[str]
                   ) -> dict[str, tuple[np.ndarray, int]]:
    """Decoded audio of the named segments from the dataset's shards; empty when the dataset is gone."""
    from pipelines.attribution.index import iter_segment_audio, read_shard_index

    if not dataset_id or not segment_ids:
        return {}
    try:
        entries = [row for row in read_shard_index(workspace, dataset_id) if row["segment_id"] in set(segment_ids)]
        return {segment_id: (audio, rate) for segment_id, audio, rate in
                iter_segment_audio(workspace.dataset_dir(dataset_id), entries)}
    except FileNotFoundError:
        return {}


def _mel_png(audio: np.ndarray, sample_rate_hz: int, path: Path, title: str) -> None:
    """Log-mel image (64 bands, 10 ms hop at 32 kHz-equivalent) of mono ``audio`` float32 ``(C, S)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = MelConfig(sample_rate_hz=sample_rate_hz, n_fft=1024 if sample_rate_hz >= 16000 else 512,
                       hop_length=max(1, sample_rate_hz // 100), n_mels=64)
    mel = log_mel(to_mono(audio), config)
    duration_s = audio.shape[1] / sample_rate_hz
    fig, ax = plt.subplots(figsize=(6, 2.2), dpi=100)
    ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", extent=(0, duration_s, 0, mel.shape[0]))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("mel band")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _shares_png(holders: list[dict[str, Any]], path: Path) -> None:
    """Horizontal bars: each rights holder's share of the attribution (sums to 100 %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [h["rights_holder"] for h in holders][::-1]
    shares = [100 * h["share"] for h in holders][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * max(1, len(names))), dpi=100)
    bars = ax.barh(names, shares, color="#2b6cb0")
    ax.bar_label(bars, labels=[f"{s:.1f}%" for s in shares], padding=3, fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_xlabel("share of attribution (%)")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<link rel="icon" href="data:,">
<title>linernotes · {{ generation.generation_id }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #1a202c; }
 table { border-collapse: collapse; width: 100%; margin: .5rem 0 1.5rem; }
 th, td { border-bottom: 1px solid #e2e8f0; padding: .35rem .5rem; text-align: left; vertical-align: top; }
 td.num { text-align: right; font-variant-numeric: tabular-nums; }
 .bar { background: #2b6cb0; height: .8rem; }
 img.mel { width: 100%; max-width: 36rem; display: block; }
 .meta { color: #4a5568; }
</style>
</head>
<body>
<h1>Liner notes for <code>{{ generation.generation_id }}</code></h1>
<p class="meta">prompt “{{ generation.prompt }}” · seed {{ generation.seed }} · {{ generation.duration_s }} s ·
 {{ generation.sampler }} · checkpoint <code>{{ generation.checkpoint_id }}</code> ·
 dataset <code>{{ attribution.dataset_id }}</code> · method <b>{{ method }}</b> · {{ created }}</p>

<section id="generation">
<h2>Generated track</h2>
<audio id="generation-audio" controls preload="auto" src="{{ generation_src }}"></audio>
<img class="mel" id="generation-mel" src="report_files/generation-mel.png" alt="log-mel of the generated track">
</section>

{% if attribution.no_attribution %}
<section id="no-attribution">
<h2>Nothing to attribute</h2>
<p><b>{{ attribution.no_attribution.reason }}</b>{% if attribution.no_attribution.detail %}:
 {{ attribution.no_attribution.detail }}{% endif %}.</p>
<p>No training segment is ranked and no rights holder is credited: shares are only computed from scores that
tell training segments apart.</p>
</section>
{% else %}
<section id="shares">
<h2>Rights holders</h2>
<img id="shares-chart" src="report_files/rights-holder-shares.png" alt="rights-holder shares">
<table id="shares-table">
<tr><th>rights holder</th><th>share</th><th></th></tr>
{% for h in attribution.rights_holders %}
<tr><td>{{ h.rights_holder }}</td><td class="num">{{ "%.1f" % (100 * h.share) }}%</td>
<td style="width:40%"><div class="bar" style="width: {{ "%.1f" % (100 * h.share) }}%"></div></td></tr>
{% endfor %}
</table>
<h2>Tracks</h2>
<table id="tracks-table">
<tr><th>share</th><th>track</th><th>rights holder</th><th>licence</th><th>attribution</th></tr>
{% for t in attribution.tracks %}
<tr><td class="num">{{ "%.1f" % (100 * t.share) }}%</td><td>{{ t.title or "" }} <code>{{ t.track_id }}</code></td>
<td>{{ t.rights_holder or "" }}</td><td>{{ t.license_name or t.license_id or "" }}</td><td>{{ t.attribution or "" }}</td></tr>
{% endfor %}
</table>
</section>

<section id="segments">
<h2>Top training segments</h2>
<table>
<tr><th>rank</th><th>segment</th><th>score</th><th>share</th><th>listen</th></tr>
{% for s in segments %}
<tr class="segment"><td class="num">{{ s.rank }}</td>
<td><code>{{ s.segment_id }}</code><br>{{ s.title or "" }} — {{ s.rights_holder }}<br>
<span class="meta">{{ s.license_name or s.license_id or "" }} · {{ s.attribution or "" }}</span></td>
<td class="num">{{ "%.4f" % s.score }}</td><td class="num">{{ "%.1f" % (100 * s.share) }}%</td>
<td>{% if s.audio %}<audio class="segment-audio" controls preload="auto" src="{{ s.audio }}"></audio>
<img class="mel segment-mel" src="{{ s.mel }}" alt="log-mel of {{ s.segment_id }}">
{% elif s.missing %}<span class="meta">{{ s.missing }}</span>{% endif %}</td></tr>
{% endfor %}
</table>
</section>
{% endif %}
</body>
</html>
"""


def _render(**context: Any) -> str:
    import jinja2

    environment = jinja2.Environment(autoescape=True)
    return environment.from_string(TEMPLATE).render(**context)
