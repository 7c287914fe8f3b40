"""CLI commands for rights and lineage teams: ``lineage``, ``takedown``, ``report``, ``serve``, and the global
``--store-url`` option (the lineage store on PostgreSQL). Registered on the main app by ``register(app)``."""


import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.tree import Tree

from provenance.workspace import DEFAULT_WORKDIR, STORE_URL_ENV


def register(app: typer.Typer) -> None:
    """Add the commands to ``app`` (``pipelines.cli.app``)."""
    from pipelines.cli import CliError, JsonOpt, WorkdirOpt, _emit, _errors, _progress, _say, _workspace, out_console

    @app.callback()
    def _store_url(store_url: Annotated[Optional[str], typer.Option(
            "--store-url", envvar=STORE_URL_ENV, show_envvar=True,
            help="Lineage store SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db "
                 "(default: the workspace's lineage.sqlite).")] = None) -> None:
        """Curate licensed music catalogs, train diffusion models on them, attribute what they generate."""
        if store_url:
            os.environ[STORE_URL_ENV] = store_url  # read by Workspace.at in every command

    @app.command()
    def lineage(
        entity_id: Annotated[str, typer.Argument(help="A track, dataset, checkpoint or generation id.")],
        kind: Annotated[Optional[str], typer.Option(help="Only look for this kind: track, dataset, checkpoint, "
                                                    "generation.")] = None,
        workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
        json_mode: JsonOpt = False,
    ) -> None:
        """Walk the lineage both ways: what a track reached, or where a generation came from."""
        with _errors():
            from pipelines.lineage import lineage as walk

            _emit(walk(_workspace(workdir), entity_id, kind), json_mode, lambda p: out_console.print(render_lineage(p)))

    @app.command()
    def takedown(
        rights_holder: Annotated[Optional[str], typer.Option(help="Every recording of this rights holder.")] = None,
        track: Annotated[Optional[str], typer.Option(help="One track id.")] = None,
        isrc: Annotated[Optional[str], typer.Option(help="One ISRC.")] = None,
        reason: Annotated[str, typer.Option(help="Why (kept with the opt-out).")] = "",
        rebuild: Annotated[bool, typer.Option("--rebuild/--no-rebuild",
                                              help="Re-shard affected datasets without the recordings.")] = True,
        workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
        json_mode: JsonOpt = False,
    ) -> None:
        """Opt recordings out, list every affected dataset, checkpoint and generation, build new dataset versions."""
        with _errors():
            from pipelines.takedown import run_takedown

            given = [(k, v) for k, v in (("rights_holder", rights_holder), ("track_id", track), ("isrc", isrc)) if v]
            if len(given) != 1:
                raise CliError("give exactly one of --rights-holder, --track, --isrc")
            with _progress(json_mode) as progress:
                result = run_takedown(_workspace(workdir), given[0][0], given[0][1], reason, rebuild=rebuild,
                                      status=_say, progress=progress)
            _emit(result.to_json(), json_mode, lambda p: out_console.print(*render_takedown(p)))

    @app.command()
    def report(
        generation_id: Annotated[str, typer.Argument(help="A generation id (gen-...).")],
        method: Annotated[str, typer.Option(help="Attribution method whose result the report shows.")] = "embedding",
        top_k: Annotated[int, typer.Option(help="Training segments with a player and a mel image.")] = 5,
        workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
        json_mode: JsonOpt = False,
    ) -> None:
        """Write an HTML report of a generation: players, mel images, rights-holder shares."""
        with _errors():
            from pipelines.report import build_report

            if top_k < 1:
                raise CliError(f"--top-k must be ≥ 1, got {top_k}")
            payload = build_report(_workspace(workdir), generation_id, method=method, top_k=top_k)
            _emit(payload, json_mode, lambda p: out_console.print(f"report: {p['report']}", highlight=False))

    @app.command()
    def serve(
        host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
        workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    ) -> None:
        """Serve the HTTP API (attribution, lineage, takedown; OpenAPI at /openapi.json, docs at /docs).

        Writes (POST) need ``Authorization: Bearer $LINERNOTES_API_TOKEN``; without that variable they are refused.
        """
        with _errors():
            import uvicorn

            from pipelines.api import TOKEN_ENV, create_app

            if not 0 < port < 65536:
                raise CliError(f"--port must be in 1..65535, got {port}")
            token = os.environ.get(TOKEN_ENV)
            if not token:
                _say(f"{TOKEN_ENV} is not set: read-only API (every write is refused with 403)")
            uvicorn.run(create_app(_workspace(workdir), token=token), host=host, port=port, log_level="info")


def render_lineage(payload: dict[str, Any]) -> Tree:
    """A rich tree: the record, then what it came from (↑) and what it reached (↓)."""
    kind, entity_id = payload["kind"], payload["id"]
    tree = Tree(f"[bold]{kind} {entity_id}[/]", highlight=False)
    if kind == "track":
        meta = payload["track"]
        tree.label = (f"[bold]track {entity_id}[/] {meta.get('title') or ''} — {meta.get('rights_holder') or '?'} "
                      f"(ISRC {meta.get('isrc') or '—'}, licence {meta.get('license_id') or '?'})")
        if payload["opted_out"]:
            tree.add(f"[red]opted out:[/] {payload['opted_out']}")
    down = tree.add("↓ reached")
    up = tree.add("↑ came from")
    if kind in ("checkpoint", "generation") and payload.get("dataset"):
        d = payload["dataset"]
        up.add(f"dataset {d['dataset_id']} ({d.get('num_tracks')} tracks, {d.get('num_segments')} segments)")
    if kind == "generation" and payload.get("checkpoint"):
        c = payload["checkpoint"]
        up.add(f"checkpoint {c['checkpoint_id']} (step {c['step']})")
        g = payload["generation"]
        tree.label = f"[bold]generation {entity_id}[/] “{g['prompt']}” seed {g['seed']}, {g['duration_s']:g} s"
    if kind == "dataset":
        for parent in payload["derived_from"]:
            up.add(f"derived from dataset {parent['parent_dataset_id']} ({parent['reason']})")
        for child in payload["versions"]:
            down.add(f"new version {child['dataset_id']} ({child['reason']})")
    for name in ("licenses", "rights_holders"):
        if payload.get(name):
            branch = up.add(name.replace("_", " "))
            for row in payload[name]:
                label = row.get("license_id") or row.get("rights_holder")
                extra = f" {row['license_name']}" if row.get("license_name") else ""
                branch.add(f"{label}{extra}: {row['tracks']} track(s)")
    if payload.get("tracks") and kind != "track":
        up.add(f"{len(payload['tracks'])} track(s): " + ", ".join(t["track_id"] for t in payload["tracks"][:12])
               + (" …" if len(payload["tracks"]) > 12 else ""))
    for d in payload.get("datasets", []) if kind == "track" else []:
        down.add(f"dataset {d['dataset_id']} ({d.get('segments', 0)} segment(s) of this track)")
    for c in payload.get("checkpoints", []) if kind in ("track", "dataset") else []:
        down.add(f"checkpoint {c['checkpoint_id']} (step {c['step']}, dataset {c['dataset_id']})")
    for g in payload.get("generations", []) if kind != "generation" else []:
        down.add(f"generation {g['generation_id']} “{g['prompt']}”")
    for a in payload.get("attributions", []) if kind == "track" else []:
        down.add(f"attributed in {a['generation_id']} ({a['method']}): share {a['share']:.1%}, best rank "
                 f"{a['best_rank']}")
    if kind == "generation":
        for method, result in payload["attributions"].items():
            branch = tree.add(f"attribution ({method}, top {len(result['segments'])} segments)")
            holders = branch.add("rights holders")
            for holder in result["rights_holders"]:
                holders.add(f"{holder['share']:6.1%}  {holder['rights_holder']}")
            tracks = branch.add("tracks")
            for track in result["tracks"][:10]:
                tracks.add(f"{track['share']:6.1%}  {track['track_id']} {track.get('title') or ''}")
    if kind != "generation" and not down.children:
        down.add("nothing yet")
    tree.children = [child for child in tree.children if child.children or child not in (up, down)]
    return tree


def render_takedown(payload: dict[str, Any]) -> list[Any]:
    counts = payload["counts"]
    lines: list[Any] = [f"takedown {payload['kind']}={payload['value']} "
                        f"({'registered' if payload['added'] else 'already in the registry'}), run {payload['run_id']}"]
    table = Table(title="affected", title_justify="left")
    table.add_column("what")
    table.add_column("ids", overflow="fold")
    table.add_row(f"{counts['tracks']} track(s)", ", ".join(t["track_id"] for t in payload["tracks"]) or "—")
    table.add_row(f"{counts['datasets']} dataset(s)", ", ".join(d["dataset_id"] for d in payload["datasets"]) or "—")
    table.add_row(f"{counts['checkpoints']} checkpoint(s)",
                  ", ".join(c["checkpoint_id"] for c in payload["checkpoints"]) or "—")
    table.add_row(f"{counts['generations']} generation(s)",
                  ", ".join(g["generation_id"] for g in payload["generations"]) or "—")
    lines.append(table)
    for rebuilt in payload["rebuilt"]:
        lines.append(f"new dataset {rebuilt['dataset_id']} replaces {rebuilt['parent_dataset_id']} "
                     f"({rebuilt['num_tracks']} tracks, {rebuilt['num_segments']} segments)")
    lines.append(f"full list: {payload['report_path']}")
    return lines
