"""The lineage store's schema: its tables (SQLAlchemy Core), and creating them and migrating an older store.

:class:`provenance.store.LineageStore` reads and writes these tables; :func:`create_schema` makes a new store's
tables (the lock table of :mod:`provenance.locks` included) and adds the ``runs`` and ``locks`` columns that a store
made by an earlier version lacks (every added column is nullable, so the rows already there stay valid).
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from provenance.locks import ADDED_LOCK_COLUMNS, lock_metadata, locks


metadata = sa.MetaData()

runs = sa.Table(
    "runs", metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("spec_sha256", sa.String(64), nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("code_version", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # running | succeeded | stopped | failed | interrupted
    sa.Column("started_at", sa.String(32), nullable=False),
    sa.Column("finished_at", sa.String(32)),
    sa.Column("counts", sa.Text),  # JSON
    sa.Column("outputs", sa.Text),  # JSON: {name: path}
    sa.Column("error", sa.Text),
    # the stage contract (pipelines/stage.py): the cache key, the content ids read and written, the parent run
    sa.Column("cache_key", sa.String(64), index=True),
    sa.Column("inputs", sa.Text),  # JSON: {name: content id}
    sa.Column("output_ids", sa.Text),  # JSON: {name: content id}
    sa.Column("parent_run_id", sa.String(64)),
    # the process that runs it, so a Run whose process was killed is found and marked ``interrupted``
    sa.Column("pid", sa.Integer),
    sa.Column("hostname", sa.String(255)),
    # ... and beyond its pid (provenance.process), so a Run is not taken for alive when its pid was reused
    sa.Column("boot_id", sa.String(36)),
    sa.Column("process_start_ticks", sa.BigInteger),
)
# Columns added to ``runs`` after its first release: a store made before them gains them on first open.
_ADDED_RUN_COLUMNS = ("cache_key", "inputs", "output_ids", "parent_run_id", "pid", "hostname", "boot_id",
                      "process_start_ticks")

datasets = sa.Table(
    "datasets", metadata,
    sa.Column("dataset_id", sa.String(64), primary_key=True),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), nullable=False),
    sa.Column("config_sha256", sa.String(64), nullable=False),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Column("num_tracks", sa.Integer, nullable=False),
    sa.Column("num_segments", sa.Integer, nullable=False),
    sa.Column("num_train_segments", sa.Integer, nullable=False),
    sa.Column("num_validation_segments", sa.Integer, nullable=False),
    sa.Column("num_shards", sa.Integer, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
)

dataset_tracks = sa.Table(
    "dataset_tracks", metadata,
    sa.Column("dataset_id", sa.String(64), sa.ForeignKey("datasets.dataset_id"), primary_key=True),
    sa.Column("track_id", sa.String(256), primary_key=True),
    sa.Column("num_segments", sa.Integer, nullable=False),
)

checkpoints = sa.Table(
    "checkpoints", metadata,
    sa.Column("checkpoint_id", sa.String(64), primary_key=True),
    sa.Column("dataset_id", sa.String(64), sa.ForeignKey("datasets.dataset_id"), nullable=False),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("config_sha256", sa.String(64), nullable=False),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
)

generations = sa.Table(
    "generations", metadata,
    sa.Column("generation_id", sa.String(64), primary_key=True),
    sa.Column("checkpoint_id", sa.String(64), sa.ForeignKey("checkpoints.checkpoint_id"), nullable=False),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("conditioning", sa.Text, nullable=False),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("sampler", sa.String(64), nullable=False),
    sa.Column("duration_s", sa.Float, nullable=False),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
)

attributions = sa.Table(
    "attributions", metadata,
    # the Attribution record's key: a generation id, or for `linernotes attribute FILE` the query's PCM id
    sa.Column("generation_id", sa.String(64), primary_key=True),
    sa.Column("method", sa.String(32), primary_key=True),
    sa.Column("segment_id", sa.String(300), primary_key=True),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), nullable=False),
    sa.Column("dataset_id", sa.String(64), nullable=False),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("track_id", sa.String(256), nullable=False),
    sa.Column("rights_holder", sa.Text, nullable=False),
    sa.Column("share", sa.Float, nullable=False),
)


opt_outs = sa.Table(
    "opt_outs", metadata,
    sa.Column("kind", sa.String(16), primary_key=True),  # rights_holder | track_id | isrc
    sa.Column("value", sa.String(300), primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("added_at", sa.String(32), nullable=False),
)

OPT_OUT_KINDS = ("rights_holder", "track_id", "isrc")

dataset_parents = sa.Table(
    "dataset_parents", metadata,
    # a dataset version derived from another one (a takedown re-shard): child ← parent, by which run and why
    sa.Column("dataset_id", sa.String(64), sa.ForeignKey("datasets.dataset_id"), primary_key=True),
    sa.Column("parent_dataset_id", sa.String(64), sa.ForeignKey("datasets.dataset_id"), primary_key=True),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id"), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
)


def create_schema(engine: sa.Engine, attempts: int = 5) -> None:
    """Create the tables a new store lacks and add the run columns an old one lacks. Two processes opening a new
    store at once race (``create_all`` looks, then creates; the loser's ``CREATE TABLE`` or ``ALTER TABLE`` fails
    on what the winner made): the loser tries again, finds the schema there, and goes on."""
    for attempt in range(attempts):
        try:
            metadata.create_all(engine)
            lock_metadata.create_all(engine)
            _add_missing_columns(engine, runs, _ADDED_RUN_COLUMNS)
            _add_missing_columns(engine, locks, ADDED_LOCK_COLUMNS)
            return
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def _add_missing_columns(engine: sa.Engine, table: sa.Table, added: tuple[str, ...]) -> None:
    """Add the columns ``added`` to ``table`` that a store made by an earlier version lacks (ALTER TABLE … ADD COLUMN;
    each is nullable)."""
    present = {c["name"] for c in sa.inspect(engine).get_columns(table.name)}
    missing = [name for name in added if name not in present]
    if not missing:
        return
    preparer = engine.dialect.identifier_preparer
    with engine.begin() as c:
        for name in missing:
            kind = table.c[name].type.compile(dialect=engine.dialect)
            c.execute(sa.text(f"ALTER TABLE {preparer.quote(table.name)} ADD COLUMN {preparer.quote(name)} {kind}"))
