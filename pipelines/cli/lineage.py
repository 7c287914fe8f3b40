"""Commands for rights and lineage teams: ``rights explain|opt-out``, ``runs``, ``lineage``, ``takedown``,
``report``, ``serve``: read or act on the lineage store."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.tree import Tree

from pipelines.cli.common import (
    CliError,
    JsonOpt,
    WorkdirOpt,
    app,
    emit,
    errors,
    open_workspace,
    out_console,
    run_stage_command,
    say,
)
from provenance.workspace import DEFAULT_WORKDIR

# rights -----------------------------------------------------------------------------------------------

rights_app = typer.Typer(no_args_is_help=True, help="Explain rights decisions; register opt-outs.")
app.add_typer(rights_app, name="rights")


@rights_app.command("explain")
def rights_explain(
    track_id: Annotated[str, typer.Argument(help="A track id from a delivery's tracks.csv.")],
    run: Annotated[Optional[str], typer.Option(help="Ingest run id; default the newest that saw the track.")] = None,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
) -> None:
    """Why was a track admitted or rejected? Every policy check, passed or not, and what the run recorded."""
    with errors():
        from pipelines.stages.ingest.rights import explain_track

        emit(explain_track(open_workspace(workdir), track_id, run), json_mode, _render_explain)


def _render_explain(payload: dict[str, Any]) -> None:
    purpose = payload["purpose"]
    out_console.print(f"[bold]{payload['track_id']}[/] in ingest run {payload['run_id']} "
                      f"({purpose['purpose']}, {purpose['territory']}, as of {purpose['as_of']})", highlight=False)
    if payload["field_check"]:
        out_console.print(f"[red]✗ fields:[/] {payload['field_check']}")
    table = Table(show_header=True, title_justify="left")
    for column in ("", "check", "detail"):
        table.add_column(column, overflow="fold")
    for check in payload["checks"]:
        table.add_row("[green]✓[/]" if check["passed"] else "[red]✗[/]", check["name"], check["detail"])
    out_console.print(table)
    recorded = payload["recorded"]
    out_console.print(f"recorded by the run: [bold]{recorded['status']}[/]")
    for rej in recorded["rejections"]:
        out_console.print(f"  {rej['record_kind']} {rej['record_id']}: {rej['reason']} — {rej['detail']}", highlight=False)
    if payload["duplicate_rows"]:
        out_console.print(f"{payload['duplicate_rows']} later row(s) repeat this id and were rejected as duplicate_id")


@rights_app.command("opt-out")
def rights_opt_out(
    rights_holder: Annotated[Optional[str], typer.Option(help="Opt out every recording of this rights holder.")] = None,
    track: Annotated[Optional[str], typer.Option(help="Opt out one track id.")] = None,
    isrc: Annotated[Optional[str], typer.Option(help="Opt out one ISRC.")] = None,
    reason: Annotated[str, typer.Option(help="Why (kept with the opt-out).")] = "",
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
) -> None:
    """Register an opt-out in the lineage store; every later ingest rejects what it names (opted_out)."""
    with errors():
        from pipelines.stages.ingest.rights import add_opt_out
        from provenance.policy import normalize_isrc

        given = [(k, v) for k, v in (("rights_holder", rights_holder), ("track_id", track),
                                      ("isrc", normalize_isrc(isrc) if isrc else None)) if v]
        if len(given) != 1:
            raise CliError("give exactly one of --rights-holder, --track, --isrc")
        payload = add_opt_out(open_workspace(workdir), given[0][0], given[0][1], reason)
        emit(payload, json_mode, lambda p: out_console.print(
            f"opt-out {p['kind']}={p['value']} {'registered' if p['added'] else 'was already registered'}; "
            f"{p['opt_outs']} opt-out(s) in the registry", highlight=False))


# runs -------------------------------------------------------------------------------------------------

@app.command()
def runs(workdir: WorkdirOpt = Path(DEFAULT_WORKDIR), json_mode: JsonOpt = False) -> None:
    """List the runs registered in the lineage store."""
    with errors():
        from provenance.store import LineageStore

        store = LineageStore(open_workspace(workdir).store_url)
        rows = store.list_runs()
        store.close()
        if json_mode:
            emit({"runs": rows}, True, lambda p: None)
            return
        table = Table(title="runs", title_justify="left")
        for column in ("run", "kind", "status", "started", "counts"):
            table.add_column(column, overflow="fold")
        for depth, row in run_tree(rows):
            table.add_row(("  " * (depth - 1) + "└ " if depth else "") + row["run_id"], row["kind"], row["status"],
                          row["started_at"], json.dumps(row.get("counts") or {})[:120])
        out_console.print(table)


def run_tree(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Runs in start order with each Run's child Runs (``parent_run_id``: the stages of a whole run, a takedown's
    re-shard) right under it: (depth, row)."""
    ids = {row["run_id"] for row in rows}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        parent = row.get("parent_run_id")
        children.setdefault(parent if parent in ids else None, []).append(row)
    out: list[tuple[int, dict[str, Any]]] = []

    def walk(parent: str | None, depth: int) -> None:
        for row in children.get(parent, []):
            out.append((depth, row))
            walk(row["run_id"], depth + 1)

    walk(None, 0)
    return out


@app.command()
def lineage(
    entity_id: Annotated[str, typer.Argument(help="A track, catalog version, dataset, checkpoint or generation id.")],
    kind: Annotated[Optional[str], typer.Option(help="Only look for this kind: track, catalog, dataset, checkpoint, "
                                                "generation.")] = None,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
) -> None:
    """Walk the lineage both ways: what a track reached, or where a generation came from."""
    with errors():
        from pipelines.lineage.walk import lineage as walk

        emit(walk(open_workspace(workdir), entity_id, kind), json_mode, lambda p: out_console.print(render_lineage(p)))

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
    with errors():
        given = [(k, v) for k, v in (("rights_holder", rights_holder), ("track_id", track), ("isrc", isrc)) if v]
        if len(given) != 1:
            raise CliError("give exactly one of --rights-holder, --track, --isrc")
        open_workspace(workdir)  # the opt-out registry lives there, even when the value turns out bad
    run_stage_command("takedown", None, None, workdir, json_mode, lambda p: out_console.print(*render_takedown(p)),
                      kind=given[0][0], value=given[0][1], reason=reason, rebuild=rebuild)

@app.command()
def report(
    generation_id: Annotated[str, typer.Argument(help="A generation id (gen-...).")],
    method: Annotated[str, typer.Option(help="Attribution method whose result the report shows.")] = "embedding",
    top_k: Annotated[int, typer.Option(help="Training segments with a player and a mel image.")] = 5,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
    json_mode: JsonOpt = False,
) -> None:
    """Write an HTML report of a generation: players, mel images, rights-holder shares."""
    with errors():
        from pipelines.lineage.report import build_report

        if top_k < 1:
            raise CliError(f"--top-k must be ≥ 1, got {top_k}")
        payload = build_report(open_workspace(workdir), generation_id, method=method, top_k=top_k)
        emit(payload, json_mode, lambda p: out_console.print(f"report: {p['report']}", highlight=False))

@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workdir: WorkdirOpt = Path(DEFAULT_WORKDIR),
) -> None:
    """Serve the HTTP API (attribution, lineage, takedown; OpenAPI at /openapi.json, docs at /docs).

    Writes (POST) need ``Authorization: Bearer $LINERNOTES_API_TOKEN``; without that variable they are refused.
    """
    with errors():
        import uvicorn

        from pipelines.api.app import TOKEN_ENV, create_app

        if not 0 < port < 65536:
            raise CliError(f"--port must be in 1..65535, got {port}")
        token = os.environ.get(TOKEN_ENV)
        if not token:
            say(f"{TOKEN_ENV} is not set: read-only API (every write is refused with 403)")
        uvicorn.run(create_app(open_workspace(workdir), token=token), host=host, port=port, log_level="info")


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
    _render_sources(payload, tree, up, down)
    _render_contents(payload, tree, up)
    _render_reached(payload, down)
    if kind == "generation":
        _render_attributions(payload, tree)
    if kind != "generation" and not down.children:
        down.add("nothing yet")
    tree.children = [child for child in tree.children if child.children or child not in (up, down)]
    return tree


def _render_sources(payload: dict[str, Any], tree: Tree, up: Tree, down: Tree) -> None:
    """What a checkpoint, generation, catalog version or dataset came from (and a catalog's or dataset's own
    downstream versions)."""
    kind, entity_id = payload["kind"], payload["id"]
    if kind in ("checkpoint", "generation") and payload.get("dataset"):
        d = payload["dataset"]
        up.add(f"dataset {d['dataset_id']} ({d.get('num_tracks')} tracks, {d.get('num_segments')} segments)")
    if kind == "generation" and payload.get("checkpoint"):
        c = payload["checkpoint"]
        up.add(f"checkpoint {c['checkpoint_id']} (step {c['step']})")
        g = payload["generation"]
        tree.label = f"[bold]generation {entity_id}[/] “{g['prompt']}” seed {g['seed']}, {g['duration_s']:g} s"
    if kind == "catalog":
        c = payload["catalog"]
        tree.label = (f"[bold]catalog {entity_id}[/] written by {c['stage']} (run {c['run_id']})"
                      + (" — the latest" if c["latest"] else ""))
        for v in payload["came_from"]:
            up.add(f"catalog {v['catalog_id']} (by {v['stage']}, run {v['run_id']})"
                   + (f" from delivery {v['delivery']}" if v.get("delivery") else ""))
        if c.get("delivery"):
            up.add(f"delivery {c['delivery']}")
        for child in payload["derived"]:
            down.add(f"catalog {child}")
        for run in payload["read_by"]:
            down.add(f"read by {run['kind']} run {run['run_id']} ({run['status']})")
        for d in payload["datasets"]:
            down.add(f"dataset {d['dataset_id']} ({d.get('num_tracks')} tracks, {d.get('num_segments')} segments)")
    if kind == "dataset":
        _render_dataset_sources(payload, up, down)


def _render_dataset_sources(payload: dict[str, Any], up: Tree, down: Tree) -> None:
    if payload.get("catalog"):
        up.add(f"catalog {payload['catalog']}")
    used = payload.get("decisions") or {}
    if used.get("clean_run_id"):
        branch = up.add(f"decisions of clean run {used['clean_run_id']} ({used.get('decisions')}"
                        f"{', stems in the samples' if used.get('stems') else ', mixtures only'})")
        for stem in used.get("dropped") or []:
            branch.add(f"dropped {stem['role']}{'/' + stem['instrument'] if stem['instrument'] else ''} of "
                       f"{stem['track_id']}: {stem['reason']}")
    elif used:
        up.add("no clean decisions (no clean run on that catalog version)")
    for run in payload.get("runs") or []:
        up.add(f"{'found built' if run['reused'] else 'built'} by {run['kind']} run {run['run_id']}"
               + (f" from catalog {run['catalog_id']}" if run["catalog_id"] else "")
               + (f", decisions of clean run {run['clean_run_id']}" if run["clean_run_id"] else ""))
    for parent in payload["derived_from"]:
        up.add(f"derived from dataset {parent['parent_dataset_id']} ({parent['reason']})")
    for child in payload["versions"]:
        down.add(f"new version {child['dataset_id']} ({child['reason']})")


def _render_contents(payload: dict[str, Any], tree: Tree, up: Tree) -> None:
    """Licences, rights holders and tracks behind a record; a track's stems and their latest decisions."""
    kind = payload["kind"]
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
    if kind == "track" and payload.get("stems"):
        stems = tree.add("stems (latest decisions)")
        for stem in payload["stems"]:
            name = stem["role"] + (f"/{stem['instrument']}" if stem["instrument"] else "")
            decision = stem["decision"] or "undecided"
            why = f": {stem['reason']}" if stem["reason"] else ""
            by = f" (clean run {stem['run_id']})" if stem["run_id"] else ""
            stems.add(f"{name}: {decision}{why}{by}")


def _render_reached(payload: dict[str, Any], down: Tree) -> None:
    """What a track or dataset reached: datasets, checkpoints, generations, attributions."""
    kind = payload["kind"]
    for d in payload.get("datasets", []) if kind == "track" else []:
        held = f"; stems {', '.join(d['stems'])}" if d.get("stems") else ""
        down.add(f"dataset {d['dataset_id']} ({d.get('segments', 0)} segment(s) of this track{held})")
    for c in payload.get("checkpoints", []) if kind in ("track", "dataset") else []:
        down.add(f"checkpoint {c['checkpoint_id']} (step {c['step']}, dataset {c['dataset_id']})")
    for g in payload.get("generations", []) if kind != "generation" else []:
        down.add(f"generation {g['generation_id']} “{g['prompt']}”")
    for a in payload.get("attributions", []) if kind == "track" else []:
        down.add(f"attributed in {a['generation_id']} ({a['method']}): share {a['share']:.1%}, best rank "
                 f"{a['best_rank']}")


def _render_attributions(payload: dict[str, Any], tree: Tree) -> None:
    for method, result in payload["attributions"].items():
        branch = tree.add(f"attribution ({method}, top {len(result['segments'])} segments)")
        holders = branch.add("rights holders")
        for holder in result["rights_holders"]:
            holders.add(f"{holder['share']:6.1%}  {holder['rights_holder']}")
        tracks = branch.add("tracks")
        for track in result["tracks"][:10]:
            tracks.add(f"{track['share']:6.1%}  {track['track_id']} {track.get('title') or ''}")


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
