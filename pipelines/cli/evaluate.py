"""``linernotes evaluate`` (FAD per checkpoint and a run report) and ``linernotes variations`` (a batch of
generations over seeds, guidance scales and durations). """

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipelines.cli.common import CliError, app, emit, errors, progress_bar, render_generic
from provenance.workspace import DEFAULT_WORKDIR, Workspace


@app.command()
def evaluate(
    run: Annotated[Optional[str], typer.Option(help="Train run id; default the newest succeeded train run.")] = None,
    embedder: Annotated[str, typer.Option(help="Embedding space of the FAD (cleaning.embed.load_embedder).")]
    = "mel-stats",
    num_references: Annotated[int, typer.Option(help="Validation segments to compare against (one generation "
                                                     "each).")] = 16,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps; default the checkpoint config's.")] = None,
    guidance_scale: Annotated[Optional[float], typer.Option(help="Guidance scale; default the config's.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddim/ddpm (ε, v) or euler/heun (flow).")] = None,
    vocoder: Annotated[Optional[Path], typer.Option(help="Local HiFi-GAN generator checkpoint; default "
                                                         "Griffin-Lim.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the first generation (the i-th uses seed + i).")] = 0,
    workdir: Annotated[Path, typer.Option("--workdir", "-w", envvar="LINERNOTES_WORKDIR",
                                          help="Workspace folder.")] = Path(DEFAULT_WORKDIR),
    json_mode: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """FAD of generations against held-out validation segments for every checkpoint of a train run, and a
    report (evaluation.parquet, loss_fad.png, report.html) in the evaluate run's folder."""

    with errors():
        if num_references < 1:
            raise CliError(f"--num-references must be ≥ 1, got {num_references}")
        if steps is not None and steps < 1:
            raise CliError(f"--steps must be ≥ 1, got {steps}")
        with progress_bar(json_mode) as progress:
            payload = run_evaluate(Workspace.at(workdir).ensure(), run, embedder=embedder,
                                   num_references=num_references, num_steps=steps, guidance_scale=guidance_scale,
                                   sampler=sampler, vocoder=vocoder, seed=seed, progress=progress)
        emit(payload, json_mode, render_generic("evaluate"))


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
        run_id = store.start_run("evaluate", request)
        try:
            evaluation = evaluate_run(run_dir, workspace.dataset_dir(dataset_id), embedder_model,
                                      workspace.run_dir(run_id), embedder_name=embedder,
                                      num_references=num_references, seed=seed, num_steps=num_steps,
                                      guidance_scale=guidance_scale, sampler=sampler, vocoder=vocoder,
                                      progress=progress)
            best = min(evaluation.rows, key=lambda row: row["fad"])
            counts = {"checkpoints": len(evaluation.rows), "best_step": best["step"], "best_fad": best["fad"],
                      "vocoder_floor_fad": evaluation.vocoder_floor_fad}
            store.finish_run(run_id, counts, evaluation.outputs)
        except BaseException as err:
            store.finish_run(run_id, {}, {}, status="failed", error=f"{type(err).__name__}: {err}")
            raise
        return {"stage": "evaluate", "run_id": run_id, "train_run_id": train_run["run_id"], "counts": counts,
                "fad_by_step": {str(row["step"]): row["fad"] for row in evaluation.rows},
                "outputs": evaluation.outputs}
    finally:
        store.close()


@app.command()
def variations(
    prompt: Annotated[str, typer.Option(help="Text the model is conditioned on.")],
    seed: Annotated[list[int], typer.Option(help="Seeds (repeatable).")],
    guidance_scale: Annotated[Optional[list[float]], typer.Option(help="Guidance scales (repeatable); default "
                                                                       "the checkpoint config's.")] = None,
    duration_s: Annotated[Optional[list[float]], typer.Option("--duration-s", help="Durations in seconds "
                                                                                  "(repeatable).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="Folder for the WAVs; default the run's folder.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint id; default the newest.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps; default the config's.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ddim/ddpm (ε, v) or euler/heun (flow).")] = None,
    vocoder: Annotated[Optional[Path], typer.Option(help="Local HiFi-GAN generator checkpoint.")] = None,
    workdir: Annotated[Path, typer.Option("--workdir", "-w", envvar="LINERNOTES_WORKDIR",
                                          help="Workspace folder.")] = Path(DEFAULT_WORKDIR),
    json_mode: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """A batch of variations (every seed × guidance scale × duration) written as WAVs with a variations.json."""
    from cleaning.audio import write_audio
    from pipelines.inputs import resolve_checkpoint
    from provenance.store import LineageStore
    from training.generate import generate_variations

    with errors():
        durations = duration_s or [5.0]
        if any(not 0 < d <= 600 for d in durations):
            raise CliError(f"--duration-s must be in (0, 600] seconds, got {durations}")
        workspace = Workspace.at(workdir).ensure()
        store = LineageStore(workspace.store_url)
        try:
            record = resolve_checkpoint(store, workspace, checkpoint)
            request = {"checkpoint_id": record["checkpoint_id"], "prompt": prompt, "seeds": seed,
                       "guidance_scales": guidance_scale, "durations_s": durations, "num_steps": steps,
                       "sampler": sampler, "vocoder": str(vocoder) if vocoder else None}
            run_id = store.start_run("variations", request)
            try:
                results = generate_variations(record["uri"], prompt, seed, guidance_scale or [None], durations,
                                              num_steps=steps, sampler=sampler, vocoder=vocoder)
                folder = Path(out_dir) if out_dir else workspace.run_dir(run_id)
                items = []
                for result in results:
                    name = f"seed{result.seed}-{result.sampler}-{result.duration_s:g}s.wav"
                    path = write_audio(folder / name, result.audio, result.sample_rate_hz, subtype="PCM_16")
                    items.append({"wav": str(path), "seed": result.seed, "sampler": result.sampler,
                                  "duration_s": result.duration_s})
                (folder / "variations.json").write_text(json.dumps({"prompt": prompt, **request, "items": items},
                                                                   indent=2))
                store.finish_run(run_id, {"generations": len(items)}, {"folder": str(folder)})
            except BaseException as err:
                store.finish_run(run_id, {}, {}, status="failed", error=f"{type(err).__name__}: {err}")
                raise
        finally:
            store.close()
        emit({"stage": "variations", "run_id": run_id, "counts": {"generations": len(items)},
               "outputs": {"folder": str(folder), "wavs": [item["wav"] for item in items]}}, json_mode,
              render_generic("variations"))
