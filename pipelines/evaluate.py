"""Evaluating and sampling a trained model as registered runs: ``evaluate`` (FAD of each checkpoint of a train run
against held-out validation segments, and a report) and ``variations`` (a batch of generations over seeds, guidance
scales and durations)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.inputs import resolve_checkpoint
from provenance.store import LineageStore
from provenance.workspace import Workspace


def run_evaluate(workspace: Workspace, train_run_id: str | None = None, *, embedder: str = "mel-stats",
                 num_references: int = 16, num_steps: int | None = None, guidance_scale: float | None = None,
                 sampler: str | None = None, vocoder: Path | None = None, seed: int = 0,
                 progress: Any = None) -> dict[str, Any]:
    """Evaluate a train run's checkpoints (``training.evaluate.evaluate_run``) as a registered ``evaluate`` run.

    Raises:
        FileNotFoundError: no such train run, or its checkpoint folder is gone.
        ValueError: a bad embedder name; see ``evaluate_run``.
    """
    from cleaning.embed import load_embedder
    from provenance.store import LineageStore
    from training.evaluate import evaluate_run

    store = LineageStore(workspace.store_url)
    try:
        if train_run_id:
            train_run = store.get_run(train_run_id)
            if train_run is None or train_run["kind"] != "train":
                raise FileNotFoundError(f"no train run {train_run_id} in {workspace.root}: see `linernotes runs`")
        else:
            finished = [r for r in store.list_runs("train") if r["status"] == "succeeded"]
            if not finished:
                raise FileNotFoundError(f"no finished train run in {workspace.root}: run `linernotes train` first")
            train_run = finished[-1]
        run_dir = workspace.root / "ray_results" / train_run["run_id"]
        if not run_dir.is_dir():
            raise FileNotFoundError(f"train run {train_run['run_id']} left no checkpoint folder at {run_dir}")
        dataset_id = (train_run.get("config") or {}).get("dataset_id")
        if not dataset_id:
            raise FileNotFoundError(f"train run {train_run['run_id']} names no dataset_id")
        embedder_model = load_embedder(embedder)
        request = {"train_run_id": train_run["run_id"], "dataset_id": dataset_id, "embedder": embedder,
                   "num_references": num_references, "num_steps": num_steps, "guidance_scale": guidance_scale,
                   "sampler": sampler, "vocoder": str(vocoder) if vocoder else None, "seed": seed}
        with store.run("evaluate", request) as run:
            evaluation = evaluate_run(run_dir, workspace.dataset_dir(dataset_id), embedder_model,
                                      workspace.run_dir(run.run_id), embedder_name=embedder,
                                      num_references=num_references, seed=seed, num_steps=num_steps,
                                      guidance_scale=guidance_scale, sampler=sampler, vocoder=vocoder,
                                      progress=progress)
            best = min(evaluation.rows, key=lambda row: row["fad"])
            counts = {"checkpoints": len(evaluation.rows), "best_step": best["step"], "best_fad": best["fad"],
                      "vocoder_floor_fad": evaluation.vocoder_floor_fad}
            run.counts, run.outputs = counts, evaluation.outputs
        return {"stage": "evaluate", "run_id": run.run_id, "train_run_id": train_run["run_id"], "counts": counts,
                "fad_by_step": {str(row["step"]): row["fad"] for row in evaluation.rows},
                "outputs": evaluation.outputs}
    finally:
        store.close()


def run_variations(workspace: Workspace, prompt: str, seeds: list[int], guidance_scales: list[float] | None,
                   durations_s: list[float], out_dir: Path | None = None, checkpoint_id: str | None = None,
                   num_steps: int | None = None, sampler: str | None = None,
                   vocoder: Path | None = None) -> dict[str, Any]:
    """Generate every seed × guidance scale × duration from a checkpoint (default the newest) as a ``variations``
    run: WAVs (PCM_16) and ``variations.json`` in ``out_dir`` (default the run's folder).

    Raises:
        pipelines.inputs.MissingInputError: no checkpoint.
    """
    from cleaning.audio import write_audio
    from training.generate import generate_variations

    with LineageStore(workspace.store_url) as store:
        record = resolve_checkpoint(store, workspace, checkpoint_id)
        request = {"checkpoint_id": record["checkpoint_id"], "prompt": prompt, "seeds": seeds,
                   "guidance_scales": guidance_scales, "durations_s": durations_s, "num_steps": num_steps,
                   "sampler": sampler, "vocoder": str(vocoder) if vocoder else None}
        with store.run("variations", request) as run:
            results = generate_variations(record["uri"], prompt, seeds, guidance_scales or [None], durations_s,
                                          num_steps=num_steps, sampler=sampler, vocoder=vocoder)
            folder = Path(out_dir) if out_dir else workspace.run_dir(run.run_id)
            items = []
            for result in results:
                name = f"seed{result.seed}-{result.sampler}-{result.duration_s:g}s.wav"
                path = write_audio(folder / name, result.audio, result.sample_rate_hz, subtype="PCM_16")
                items.append({"wav": str(path), "seed": result.seed, "sampler": result.sampler,
                              "duration_s": result.duration_s})
            (folder / "variations.json").write_text(json.dumps({"prompt": prompt, **request, "items": items},
                                                               indent=2))
            run.counts, run.outputs = {"generations": len(items)}, {"folder": str(folder)}
    return {"stage": "variations", "run_id": run.run_id, "counts": {"generations": len(items)},
            "outputs": {"folder": str(folder), "wavs": [item["wav"] for item in items]}}
