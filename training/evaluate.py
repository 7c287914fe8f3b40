"""Evaluation of a training run: FAD of generations against held-out validation segments, per checkpoint,
and a run report (HTML) with a plot of the training loss and FAD over steps.

For every checkpoint a run left (``**/checkpoint.pt`` under the run folder: Ray Train's
``checkpoint_*`` folders and ``final/``), ``evaluate_checkpoint`` generates one clip per validation segment
(its text and musical conditions as the prompt, seeds ``seed + i``, the segment's duration) and measures
the Fréchet Audio Distance (Kilgour et al. 2019; ``cleaning.fad``) between the generations and the
validation audio in an ``Embedder``'s space (the same interface blind cleaning uses; default
``mel-stats``, no downloaded weights). A floor is measured once per run: the FAD of the validation
mels re-synthesised by the vocoder, the score a generator that reproduced the validation mels exactly
would get. The loss curve comes from what the trainer already writes: the per-step ``losses`` in the
newest checkpoint (``progress.json`` otherwise). Absolute FAD values depend on the embedder; compare
checkpoints of one run, with one embedder.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from cleaning.audio import read_audio, to_mono
from cleaning.fad import embed_stats, frechet_distance
from provenance.attribution import Embedder
from provenance.records import write_json, write_table, write_text
from training.data import read_dataset_info
from training.generate import LoadedCheckpoint, generate, load_checkpoint
from training.vocoder import load_vocoder

EVALUATION_SCHEMA = pa.schema([
    pa.field("step", pa.int64(), nullable=False),
    pa.field("checkpoint_path", pa.string(), nullable=False),
    pa.field("fad", pa.float64(), nullable=False),
    pa.field("num_generations", pa.int64(), nullable=False),
    pa.field("num_reference", pa.int64(), nullable=False),
    pa.field("sampler", pa.string(), nullable=False),
    pa.field("embedder", pa.string(), nullable=False),
])
"""One row per evaluated checkpoint (``evaluation.parquet``)."""


@dataclass(frozen=True)
class ReferenceClip:
    """A held-out validation segment: float32 ``(1, samples)`` audio, its rate, log-mel and json metadata."""

    audio: np.ndarray
    sample_rate_hz: int
    mel: np.ndarray
    meta: dict[str, Any]


@dataclass
class RunEvaluation:
    """What ``evaluate_run`` measured and wrote.

    Attributes:
        rows: one dict per checkpoint (``EVALUATION_SCHEMA`` fields), sorted by step.
        loss_steps, losses: the per-step training loss (``(steps,)`` int64 and float64).
        vocoder_floor_fad: FAD of vocoded validation mels against the validation audio.
        outputs: ``{"parquet", "plot", "report", "json"}`` paths.
    """

    rows: list[dict[str, Any]]
    loss_steps: np.ndarray
    losses: np.ndarray
    vocoder_floor_fad: float
    outputs: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"checkpoints": self.rows, "vocoder_floor_fad": self.vocoder_floor_fad,
                "final_loss": float(self.losses[-1]) if self.losses.size else None, "outputs": self.outputs}


def find_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint.pt`` under ``run_dir``, one per step (the first path in sorted
    order wins), sorted by step.

    Raises:
        FileNotFoundError: ``run_dir`` holds no checkpoint.
    """
    by_step: dict[int, Path] = {}
    for path in sorted(Path(run_dir).rglob("checkpoint.pt")):
        step = int(torch.load(path, map_location="cpu", weights_only=True)["step"])
        by_step.setdefault(step, path)
    if not by_step:
        raise FileNotFoundError(f"no checkpoint.pt under {run_dir}")
    return sorted(by_step.items())


def read_loss_curve(run_dir: str | os.PathLike[str],
                    checkpoints: Sequence[tuple[int, Path]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The training loss per step: ``(steps int64 (n,), losses float64 (n,))``, steps from 1.

    Read from the newest checkpoint's ``losses`` (every step's loss, averaged over ranks); a run without
    one falls back to ``progress.json`` (its last logged step only).
    """
    checkpoints = checkpoints if checkpoints is not None else find_checkpoints(run_dir)
    state = torch.load(checkpoints[-1][1], map_location="cpu", weights_only=True)
    losses = np.asarray(state.get("losses") or [], dtype=np.float64)
    if losses.size:
        return np.arange(1, losses.size + 1, dtype=np.int64), losses
    progress = Path(run_dir) / "progress.json"
    if progress.is_file():
        note = json.loads(progress.read_text())
        if note.get("loss") is not None:
            return np.asarray([int(note["step"])]), np.asarray([float(note["loss"])])
    return np.zeros(0, dtype=np.int64), np.zeros(0)


def read_reference_clips(shard_paths: Sequence[str | os.PathLike[str]], limit: int | None = None) -> list[ReferenceClip]:
    """Validation segments from WebDataset shards: the ``flac``, ``mel.npy`` and ``json`` members of each sample,
    in shard order, at most ``limit``.

    Raises:
        ValueError: no complete sample in the shards.
    """
    clips: list[ReferenceClip] = []
    for shard in shard_paths:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, extension = info.name.partition(".")
                data = tar.extractfile(info)
                if data is not None and extension in ("flac", "mel.npy", "json"):
                    members.setdefault(key, {})[extension] = data.read()
        for key in sorted(members):
            sample = members[key]
            if {"flac", "mel.npy", "json"} - sample.keys():
                continue
            audio, rate = read_audio(io.BytesIO(sample["flac"]))
            clips.append(ReferenceClip(to_mono(audio), int(rate), np.load(io.BytesIO(sample["mel.npy"])).astype(
                np.float32), json.loads(sample["json"])))
            if limit is not None and len(clips) >= limit:
                return clips
    if not clips:
        raise ValueError(f"no validation samples (flac + mel.npy + json) in {[str(s) for s in shard_paths]}")
    return clips


def evaluate_checkpoint(checkpoint: LoadedCheckpoint | str | os.PathLike[str], references: Sequence[ReferenceClip],
                        embedder: Embedder, *, seed: int = 0, num_steps: int | None = None,
                        guidance_scale: float | None = None, sampler: str | None = None,
                        vocoder: Any = None, max_duration_s: float = 10.0) -> tuple[float, str]:
    """FAD between generations and the reference clips, one generation per reference.

    Generation ``i`` uses reference ``i``'s text (``meta["text"]``) and metadata as its conditions, seed
    ``seed + i`` and the reference's duration (at most ``max_duration_s``).

    Returns:
        ``(fad, sampler name)``.

    Raises:
        ValueError: no references.
    """
    if not references:
        raise ValueError("evaluate_checkpoint needs at least one reference clip")
    checkpoint = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    generations, name = [], ""
    for index, ref in enumerate(references):
        duration_s = min(ref.audio.shape[-1] / ref.sample_rate_hz, max_duration_s)
        result = generate(checkpoint, str(ref.meta.get("text", "")), seed + index, duration_s, num_steps=num_steps,
                          guidance_scale=guidance_scale, sampler=sampler, conditions=ref.meta, vocoder=vocoder)
        generations.append((result.audio, result.sample_rate_hz))
        name = result.sampler
    reference_stats = embed_stats(embedder, [(ref.audio, ref.sample_rate_hz) for ref in references])
    return frechet_distance(embed_stats(embedder, generations), reference_stats), name


def vocoder_floor_fad(checkpoint: LoadedCheckpoint, references: Sequence[ReferenceClip], embedder: Embedder,
                      vocoder: Any = None) -> float:
    """FAD of the references' own mels, vocoded, against the references: the floor for this vocoder."""
    voc = vocoder if callable(vocoder) else load_vocoder(vocoder, checkpoint.mel_config)
    resynthesised = []
    for ref in references:
        num_samples = round(ref.audio.shape[-1] * checkpoint.mel_config.sample_rate_hz / ref.sample_rate_hz)
        audio = voc(ref.mel, num_samples=num_samples)
        peak = float(np.abs(audio).max()) or 1.0
        resynthesised.append(((audio * 10 ** (-1 / 20) / peak).astype(np.float32), checkpoint.mel_config.sample_rate_hz))
    return frechet_distance(embed_stats(embedder, resynthesised),
                            embed_stats(embedder, [(ref.audio, ref.sample_rate_hz) for ref in references]))


def evaluate_run(run_dir: str | os.PathLike[str], dataset_dir: str | os.PathLike[str], embedder: Embedder,
                 out_dir: str | os.PathLike[str], *, embedder_name: str = "mel-stats", num_references: int = 16,
                 seed: int = 0, num_steps: int | None = None, guidance_scale: float | None = None,
                 sampler: str | None = None, vocoder: str | os.PathLike[str] | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> RunEvaluation:
    """Evaluate every checkpoint of a run on the dataset's validation split and write the report.

    Writes into ``out_dir``: ``evaluation.parquet`` (``EVALUATION_SCHEMA``), ``evaluation.json``,
    ``loss_fad.png`` (loss and FAD over steps) and ``report.html`` (the plot and a table).

    Args:
        run_dir: the training run's folder (``ray_results/RUN``), holding ``**/checkpoint.pt``.
        dataset_dir: the dataset folder (``dataset.json`` with a ``validation`` split).
        embedder: the embedding space of the FAD; ``embedder_name`` labels it in the outputs.
        num_references: validation segments used (the first, in shard order).
        seed, num_steps, guidance_scale, sampler, vocoder: passed to ``generate``.
        progress: ``progress(message, done, total)`` after each checkpoint.

    Raises:
        FileNotFoundError: no checkpoints, or no dataset.
        ValueError: the dataset has no validation shards, or a checkpoint of another dataset.
    """
    info = read_dataset_info(dataset_dir)
    shards = info.shards.get("validation") or []
    if not shards:
        raise ValueError(f"dataset {info.dataset_id} has no validation shards to evaluate against")
    references = read_reference_clips(shards, limit=num_references)
    checkpoints = find_checkpoints(run_dir)
    loss_steps, losses = read_loss_curve(run_dir, checkpoints)
    voc = load_vocoder(vocoder, load_checkpoint(checkpoints[-1][1]).mel_config) if vocoder else None
    rows: list[dict[str, Any]] = []
    floor = math.nan
    for done, (step, path) in enumerate(checkpoints):
        checkpoint = load_checkpoint(path)
        if checkpoint.dataset_id != info.dataset_id:
            raise ValueError(f"checkpoint {path} was trained on {checkpoint.dataset_id}, not {info.dataset_id}")
        if math.isnan(floor):
            floor = vocoder_floor_fad(checkpoint, references, embedder, voc)
        value, name = evaluate_checkpoint(checkpoint, references, embedder, seed=seed, num_steps=num_steps,
                                          guidance_scale=guidance_scale, sampler=sampler, vocoder=voc)
        rows.append({"step": step, "checkpoint_path": str(path), "fad": value, "num_generations": len(references),
                     "num_reference": len(references), "sampler": name, "embedder": embedder_name})
        if progress is not None:
            progress("evaluating checkpoints", done + 1, len(checkpoints))
    evaluation = RunEvaluation(rows, loss_steps, losses, floor)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_table(pa.Table.from_pylist(rows, schema=EVALUATION_SCHEMA), out / "evaluation.parquet")
    plot = plot_loss_and_fad(loss_steps, losses, rows, floor, out / "loss_fad.png")
    report = write_report(evaluation, plot, out / "report.html", title=f"run {Path(run_dir).name}")
    evaluation.outputs = {"parquet": str(out / "evaluation.parquet"), "plot": str(plot), "report": str(report),
                          "json": str(out / "evaluation.json")}
    write_json(evaluation.to_json(), out / "evaluation.json")
    return evaluation


def plot_loss_and_fad(loss_steps: np.ndarray, losses: np.ndarray, rows: Sequence[dict[str, Any]], floor: float,
                      path: str | os.PathLike[str]) -> Path:
    """PNG: training loss (per step, and a moving average) on the left axis, FAD per checkpoint on the right,
    the vocoder floor as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    if losses.size:
        loss_axis.plot(loss_steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss (per step)")
        window = max(1, min(50, losses.size // 10))
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        loss_axis.plot(loss_steps[window - 1:], smooth, color="tab:blue", label=f"loss ({window}-step mean)")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss (MSE)", color="tab:blue")
    fad_axis = loss_axis.twinx()
    if rows:
        fad_axis.plot([r["step"] for r in rows], [r["fad"] for r in rows], "o-", color="tab:red", label="FAD")
    if math.isfinite(floor):
        fad_axis.axhline(floor, color="tab:red", linestyle="--", alpha=0.6, label="vocoder floor (FAD)")
    fad_axis.set_ylabel("FAD to validation (lower is better)", color="tab:red")
    handles = loss_axis.get_legend_handles_labels()[0] + fad_axis.get_legend_handles_labels()[0]
    labels = loss_axis.get_legend_handles_labels()[1] + fad_axis.get_legend_handles_labels()[1]
    loss_axis.legend(handles, labels, loc="upper right", fontsize=8)
    loss_axis.set_title("training loss and FAD over steps")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def write_report(evaluation: RunEvaluation, plot: Path, path: str | os.PathLike[str], title: str) -> Path:
    """A self-contained HTML page: the plot (relative link) and a table of FAD per checkpoint."""
    rows = "".join(
        f"<tr><td>{r['step']}</td><td>{r['fad']:.4f}</td><td>{r['num_generations']}</td>"
        f"<td>{html.escape(r['sampler'])}</td><td><code>{html.escape(r['checkpoint_path'])}</code></td></tr>"
        for r in evaluation.rows)
    final_loss = f"{evaluation.losses[-1]:.4f}" if evaluation.losses.size else "n/a"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>linernotes evaluation: {html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head>
<body><h1>Evaluation: {html.escape(title)}</h1>
<p>Fréchet Audio Distance (Kilgour et al. 2019) between one generation per held-out validation segment and the
segments themselves, embedder <code>{html.escape(evaluation.rows[0]['embedder'] if evaluation.rows else '')}</code>.
Vocoder floor (validation mels re-synthesised): {evaluation.vocoder_floor_fad:.4f}. Final training loss:
{final_loss} after {int(evaluation.loss_steps[-1]) if evaluation.loss_steps.size else 0} steps.</p>
<img src="{html.escape(plot.name)}" alt="loss and FAD over steps" width="800">
<table><tr><th>step</th><th>FAD</th><th>generations</th><th>sampler</th><th>checkpoint</th></tr>{rows}</table>
</body></html>
"""
    return write_text(page, path)
