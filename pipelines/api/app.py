"""The HTTP API (FastAPI): attribution and lineage queries for rights teams, opt-outs and takedowns.

Reads are open; every write (``POST``) needs ``Authorization: Bearer <token>`` with the server's token
(``$LINERNOTES_API_TOKEN``, or ``create_app(token=...)``). A server started without a token refuses every
write with 403. Errors are JSON ``{"detail": ...}``: 401 missing or wrong token, 403 writes disabled,
404 unknown id, 409 missing input (no dataset yet) or a workspace another run holds, 413 upload too large, 422
malformed request or undecodable audio.

The endpoints that run a stage (``POST /attribute``, ``POST /takedown``) take the workspace lock for it, as every stage
does (:func:`pipelines.stage.run_stage`): while a ``linernotes run`` or another stage holds the workspace they answer
409 at once, ``{"detail": "the workspace:… is in use by run RUN_ID (…)", "holder": {"run_id", "pid", "hostname",
"since"}}``. The OpenAPI spec is at ``/openapi.json``, interactive docs at ``/docs``.

A query with nothing to attribute (a silent upload, or scores that cannot be shared) is an answer, not an error:
200 with no segments, tracks or rights holders and ``no_attribution: {reason, detail}`` (``POST /attribute`` and the
attribution ``GET``s alike); a normal answer has ``no_attribution: null``.

Endpoints:
    GET  /health                                   store backend, version
    GET  /lineage/{id}?kind=                       ``pipelines.lineage.walk.lineage``
    GET  /generations/{id}/attribution?method=     stored attribution of a generation
    GET  /attributions/{query_id}?method=          stored attribution of any query (``pcm-...`` for files)
    GET  /opt-outs                                 the opt-out registry
    GET  /generations/{id}/report                  the HTML report (built on first request; a redirect)
    GET  /files/generations/{id}/...               generation folders (WAV, report files)
    POST /attribute                                multipart ``file`` (+ ``top_k``, ``dataset_id``, ``method``): the
                                                   ``attribute`` stage, through the runner
    POST /takedown                                 JSON ``{kind, value, reason, rebuild}``: the ``takedown`` stage
    POST /opt-outs                                 JSON ``{kind, value, reason}``
"""


import io
import secrets
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile, status
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from provenance.locks import LockHeld
from provenance.store import LineageStore, code_version
from provenance.workspace import Workspace

TOKEN_ENV = "LINERNOTES_API_TOKEN"
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
METHOD_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"

OptOutKind = Literal["rights_holder", "track_id", "isrc"]


class OptOutRequest(BaseModel):
    """An opt-out: every recording of a rights holder, one track id, or one ISRC."""

    model_config = ConfigDict(extra="forbid")
    kind: OptOutKind
    value: str = Field(min_length=1, max_length=300, pattern=r"\S")
    reason: str = Field(default="", max_length=2000)


class TakedownRequest(OptOutRequest):
    """An opt-out plus the list of what it affects; ``rebuild`` re-shards affected datasets (synchronous:
    minutes on a large catalog; ``linernotes takedown`` does the same from a shell)."""

    rebuild: bool = False


def create_app(workspace: Workspace, token: str | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The API over one workspace (and its lineage store).

    Args:
        token: the bearer token that authorises writes; ``None`` or empty refuses every write (403).
        max_upload_bytes: largest audio upload ``POST /attribute`` accepts (413 above it).
    """
    app = FastAPI(title="linernotes", version=code_version(),
                  description="Attribution and lineage of generated music; opt-outs and takedowns. "
                              "Writes need `Authorization: Bearer <token>`.")
    workspace.ensure()
    app.include_router(_read_routes(workspace))
    app.mount("/files/generations", StaticFiles(directory=workspace.generations_dir, check_dir=False),
              name="generation-files")
    app.include_router(_write_routes(workspace, max_upload_bytes), dependencies=[Depends(_token_check(token))])
    app.add_exception_handler(LockHeld, _workspace_held)
    return app


def _workspace_held(request: Request, err: LockHeld) -> JSONResponse:
    """409 for a stage refused the workspace lock, naming the run that holds it."""
    info = err.info
    return JSONResponse({"detail": str(err), "holder": {"run_id": info.holder, "pid": info.pid,
                                                        "hostname": info.hostname, "since": info.acquired_at}},
                        status_code=status.HTTP_409_CONFLICT)


def _token_check(token: str | None) -> Any:
    """The dependency every write needs: the bearer token, compared in constant time."""
    bearer = HTTPBearer(auto_error=False, description="The server's API token ($LINERNOTES_API_TOKEN).")

    def require_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if not token:
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"writes are disabled: the server was started without {TOKEN_ENV}")
        if credentials is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "this endpoint writes: send Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid bearer token",
                                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    return require_token


def _read_routes(workspace: Workspace) -> APIRouter:
    """The open endpoints: health, lineage, stored attributions, the opt-out registry, reports."""
    router = APIRouter()
    @router.get("/health", tags=["meta"])
    def health() -> dict[str, Any]:
        import sqlalchemy as sa

        return {"status": "ok", "version": code_version(),
                "store_backend": sa.make_url(workspace.store_url).get_backend_name()}

    @router.get("/lineage/{entity_id}", tags=["lineage"])
    def get_lineage(entity_id: str,
                    kind: Literal["track", "catalog", "dataset", "checkpoint", "generation"] | None = None
                    ) -> dict[str, Any]:
        """Lineage of a track, catalog version, dataset, checkpoint or generation, both ways (``linernotes
        lineage``)."""
        from pipelines.lineage.walk import LineageError, lineage

        try:
            return _jsonable(lineage(workspace, entity_id, kind))
        except LineageError as err:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from err

    @router.get("/generations/{generation_id}/attribution", tags=["attribution"])
    def get_generation_attribution(generation_id: str,
                                   method: Annotated[str, Query(pattern=METHOD_PATTERN)] = "embedding"
                                   ) -> dict[str, Any]:
        """The stored attribution of a generation: ranked segments, shares per track and rights holder."""
        store = LineageStore(workspace.store_url)
        try:
            generation = store.get_generation(generation_id)
        finally:
            store.close()
        if generation is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no generation {generation_id!r}")
        return {"generation": generation, **_attribution(workspace, generation_id, method)}

    @router.get("/attributions/{query_id}", tags=["attribution"])
    def get_attribution(query_id: str, method: Annotated[str, Query(pattern=METHOD_PATTERN)] = "embedding"
                        ) -> dict[str, Any]:
        """The stored attribution of any query: a generation id, or ``pcm-...`` of an attributed file."""
        return _attribution(workspace, query_id, method)

    @router.get("/opt-outs", tags=["rights"])
    def get_opt_outs() -> dict[str, Any]:
        store = LineageStore(workspace.store_url)
        try:
            return {"opt_outs": store.list_opt_outs()}
        finally:
            store.close()

    @router.get("/generations/{generation_id}/report", tags=["attribution"], response_class=RedirectResponse,
             status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    def get_report(generation_id: str, method: Annotated[str, Query(pattern=METHOD_PATTERN)] = "embedding",
                   top_k: Annotated[int, Query(ge=1, le=50)] = 5, rebuild: bool = False) -> RedirectResponse:
        """The generation's HTML report (players, mel images, shares chart), built when missing (or with
        ``rebuild``): redirects to ``/files/generations/{id}/report.html``, where its relative links resolve."""
        from pipelines.lineage.report import ReportError, build_report, report_path

        if rebuild or not report_path(workspace, generation_id).is_file():
            try:
                build_report(workspace, generation_id, method=method, top_k=top_k)
            except ReportError as err:
                raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from err
        return RedirectResponse(f"/files/generations/{quote(generation_id)}/report.html",
                                status_code=status.HTTP_307_TEMPORARY_REDIRECT)

    return router


def _write_routes(workspace: Workspace, max_upload_bytes: int) -> APIRouter:
    """The endpoints that write (each behind the token): attribute an upload, opt-outs, takedowns."""
    router = APIRouter()

    @router.post("/attribute", tags=["attribution"])
    def post_attribute(file: Annotated[UploadFile, File(description="Audio: WAV, FLAC, Ogg or MP3.")],
                       top_k: Annotated[int, Form(ge=1, le=1000)] = 10,
                       dataset_id: Annotated[str | None, Form(max_length=64)] = None,
                       method: Annotated[str, Form(pattern=METHOD_PATTERN)] = "embedding") -> dict[str, Any]:
        """Attribute an uploaded audio file; the result is stored under the file's ``pcm-`` id. A silent upload
        (peak below the stage's ``silence_floor_dbfs``) is 200 with no segments or shares and its ``no_attribution``
        reason, and nothing is stored."""
        from cleaning.audio import AudioDecodeError, read_audio
        from pipelines.attribution.attribute import ATTRIBUTE, attribute_config
        from pipelines.inputs import MissingInputError
        from pipelines.stage import run_stage

        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413,
                                f"upload is larger than {max_upload_bytes} bytes")
        if not data:
            raise HTTPException(422, "the uploaded file is empty")
        try:
            audio, sample_rate_hz = read_audio(io.BytesIO(data))
        except (AudioDecodeError, RuntimeError, ValueError) as err:
            raise HTTPException(422,
                                f"{file.filename or 'upload'} is not decodable audio: {err}") from err
        if audio.shape[1] == 0:
            raise HTTPException(422, f"{file.filename} decodes to no samples")
        try:
            config = attribute_config(method=method, top_k=top_k)
            result = run_stage(ATTRIBUTE, workspace, config, select={"dataset": dataset_id},
                               options={"query_audio": (audio, sample_rate_hz)})
        except MissingInputError as err:
            raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from err
        except ValueError as err:  # e.g. an attribution method the stage does not know
            raise HTTPException(422, str(err)) from err
        return _jsonable(result.to_json())

    @router.post("/opt-outs", tags=["rights"], status_code=status.HTTP_201_CREATED)
    def post_opt_out(request: OptOutRequest) -> JSONResponse:
        """Register an opt-out; 201 when new, 200 when it was already registered."""
        from pipelines.stages.takedown import parse_takedown

        kind, value = parse_takedown(request.kind, request.value)
        store = LineageStore(workspace.store_url)
        try:
            added = store.add_opt_out(kind, value, request.reason)
            payload = {"kind": kind, "value": value, "added": added, "opt_outs": len(store.list_opt_outs())}
        finally:
            store.close()
        return JSONResponse(payload, status_code=status.HTTP_201_CREATED if added else status.HTTP_200_OK)

    @router.post("/takedown", tags=["rights"])
    def post_takedown(request: TakedownRequest) -> dict[str, Any]:
        """Opt out, list every affected dataset, checkpoint, generation and attribution; optionally re-shard."""
        from pipelines.inputs import MissingInputError
        from pipelines.stage import run_stage
        from pipelines.stages.takedown import TAKEDOWN, TakedownConfig

        try:
            config = TakedownConfig(kind=request.kind, value=request.value, reason=request.reason,
                                    rebuild=request.rebuild)
            result = run_stage(TAKEDOWN, workspace, config)
        except (FileNotFoundError, MissingInputError) as err:
            raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from err
        except ValueError as err:
            raise HTTPException(422, str(err)) from err
        return _jsonable(result.to_json())

    return router


def _attribution(workspace: Workspace, query_id: str, method: str) -> dict[str, Any]:
    """The stored ``method`` attribution of ``query_id`` (``no_attribution`` None); or, when its attribute Run found
    nothing to attribute, no segments or shares and ``no_attribution`` with the reason. 404 otherwise."""
    from pipelines.lineage.walk import find_no_attribution, known_tracks, summarize_attribution

    store = LineageStore(workspace.store_url)
    try:
        rows = store.get_attributions(query_id)
        methods = sorted({row["method"] for row in rows})
        mine = [row for row in rows if row["method"] == method]
        if mine:
            return {"query_id": query_id, "method": method, "methods": methods,
                    **summarize_attribution(mine, known_tracks(workspace, store)), "no_attribution": None}
        why = find_no_attribution(store, query_id, method)
        if why is None:
            have = f"it has {', '.join(methods)}" if methods else "none is stored"
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no {method} attribution for {query_id!r} ({have})")
        return {"query_id": query_id, "method": method, "methods": methods, "dataset_id": why["dataset_id"],
                "run_id": why["run_id"], "segments": [], "tracks": [], "rights_holders": [],
                "no_attribution": {"reason": why["reason"], "detail": why["detail"]}}
    finally:
        store.close()


def _jsonable(payload: Any) -> Any:
    """Paths and other non-JSON values as strings."""
    import json

    return json.loads(json.dumps(payload, default=str))
