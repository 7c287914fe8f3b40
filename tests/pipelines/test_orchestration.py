"""Dagster definitions (pipelines/orchestration.py), in-process, no daemon: they load and validate (in Python and as
`dagster definitions validate` from the repository root); the inbox sensor adds a delivery's partition and requests
one run once its `_READY` marker is there, and never again; materializing a partition gives the dataset of
`linernotes run` on that delivery, with the stage's counts as metadata and Great Expectations as asset checks; the
opt-out schedule requests a run only after an opt-out, and only for the delivery holding the opted-out recording."""

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import dagster as dg
import pytest
import soundfile as sf
import yaml

from pipelines.orchestration import (
    DELIVERIES,
    READY_MARKER,
    REGISTRY_KEY,
    DeliveryInbox,
    LinernotesWorkspace,
    RayCluster,
    build_definitions,
)
from pipelines.stages.ingest.rights import add_opt_out
from provenance.store import LineageStore
from provenance.workspace import Workspace
from tests.conftest import sine
from tests.pipelines.test_ingest import LICENSES, track, write_csv

os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parents[2]
LINERNOTES = Path(sys.executable).with_name("linernotes")
SHARD = {"segment_s": 0.5, "sample_rate_hz": 16000, "n_fft": 256, "hop_length": 128, "validation_fraction": 0.0}
#: delivery → {track id: (ISRC, sine frequency in Hz)}
DELIVERY_TRACKS = {"delivery-a": {"a": ("GBAAA2600001", 440.0), "b": ("GBAAA2600002", 550.0)},
                   "delivery-b": {"c": ("USBBB2600003", 660.0)}}


def make_delivery(root: Path, tracks: dict[str, tuple[str, float]], ready: bool = True) -> Path:
    """A CSV delivery of 2 s licensed mixtures (22.05 kHz), with its `_READY` marker when ``ready``."""
    root.mkdir(parents=True)
    for track_id, (_, frequency_hz) in tracks.items():
        sf.write(root / f"{track_id}.wav", sine(frequency_hz, 2.0, 22050, 0.5).T, 22050)
    write_csv(root / "licenses.csv", LICENSES[:1], list(LICENSES[0]))
    rows = [{**track(t, "L-open"), "isrc": isrc} for t, (isrc, _) in tracks.items()]
    write_csv(root / "tracks.csv", rows, list(rows[0]))
    write_csv(root / "files.csv", [{"track_id": t, "role": "mixture", "instrument": "", "path": f"{t}.wav"}
                                   for t in tracks], ["track_id", "role", "instrument", "path"])
    if ready:
        (root / READY_MARKER).write_text("")
    return root


def write_spec(path: Path, **stages: dict) -> Path:
    spec = {"delivery": None, "purpose": {"commercial": True, "territory": "Worldwide", "as_of": "2026-11-21"},
            "stages": stages or {"ingest": {}, "shard": dict(SHARD)}, "engine": {"num_cpus": 1}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two ready deliveries in an inbox, a spec (ingest + shard), its definitions, a Dagster instance on SQLite in a
    temporary folder, and the resources pointing at a temporary workspace."""
    tmp = tmp_path_factory.mktemp("orchestration")
    inbox = tmp / "inbox"
    for name, tracks in DELIVERY_TRACKS.items():
        make_delivery(inbox / name, tracks)
    spec = write_spec(tmp / "spec.yaml")
    resources = {"inbox": DeliveryInbox(path=str(inbox)), "workspace": LinernotesWorkspace(root=str(tmp / "work")),
                 "ray": RayCluster()}
    (tmp / "dagster-home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp / "dagster-home")) as instance:
        yield {"tmp": tmp, "inbox": inbox, "spec": spec, "defs": build_definitions(spec), "instance": instance,
               "resources": resources, "workspace": Workspace.at(tmp / "work")}


def assets_of(defs: dg.Definitions) -> dg.AssetsDefinition:
    (assets,) = defs.assets
    return assets


def materialize(setup: dict, delivery: str) -> dict[str, dict]:
    """Materialize every asset of one partition: {stage: its materialization's metadata values}, and under
    ``checks`` {asset check: passed}."""
    instance = setup["instance"]
    if not instance.has_dynamic_partition(DELIVERIES.name, delivery):
        instance.add_dynamic_partitions(DELIVERIES.name, [delivery])
    result = dg.materialize([assets_of(setup["defs"])], partition_key=delivery, instance=instance,
                            resources=setup["resources"])
    assert result.success
    found = {event.asset_key.to_user_string(): {k: v.value for k, v in event.materialization.metadata.items()}
             for event in result.get_asset_materialization_events()}
    return {**found, "checks": {e.check_name: e.passed for e in result.get_asset_check_evaluations()}}


@pytest.fixture(scope="module")
def curated(setup, ray_local):
    """Both deliveries materialized once."""
    return {name: materialize(setup, name) for name in DELIVERY_TRACKS}


def test_definitions_load_validate_and_a_changed_stage_config_changes_only_its_code_version(setup, tmp_path):
    from pipelines import orchestration

    for defs in (setup["defs"], orchestration.defs):  # the test's spec, and the default (infra/runs/inbox.yaml)
        dg.Definitions.validate_loadable(defs)
    assets = assets_of(setup["defs"])
    assert {k.to_user_string() for k in assets.keys} == {"ingest", "shard"}
    assert assets.asset_deps[dg.AssetKey("shard")] == {dg.AssetKey("ingest")}
    assert assets.partitions_def == DELIVERIES
    assert {k.name for k in assets.check_keys} == {"delivery_expectations", "curated_expectations"}
    assert {s.name for s in setup["defs"].sensors} == {"delivery_inbox"}
    assert {s.name for s in setup["defs"].schedules} == {"opt_out_recuration"}

    versions = assets.code_versions_by_key
    changed = build_definitions(write_spec(tmp_path / "changed.yaml", ingest={}, shard={**SHARD, "segment_s": 0.25}))
    changed_versions = assets_of(changed).code_versions_by_key
    assert changed_versions[dg.AssetKey("ingest")] == versions[dg.AssetKey("ingest")]
    assert changed_versions[dg.AssetKey("shard")] != versions[dg.AssetKey("shard")]
    # a spec without ingest has no opt-out schedule (only ingest applies the registry to a delivery)
    assert not build_definitions(write_spec(tmp_path / "shard-only.yaml", shard=dict(SHARD))).schedules


def test_dagster_definitions_validate_finds_the_module_from_pyproject(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "DAGSTER_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("LINERNOTES_SPEC", None)
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    done = subprocess.run([str(Path(sys.executable).with_name("dagster")), "definitions", "validate"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Validation successful for code location linernotes" in done.stderr + done.stdout


def test_the_sensor_requests_one_run_per_ready_delivery_and_never_a_half_uploaded_one(setup, tmp_path):
    inbox = tmp_path / "inbox"
    uploading = make_delivery(inbox / "delivery-1", DELIVERY_TRACKS["delivery-a"], ready=False)
    make_delivery(inbox / ".staging", DELIVERY_TRACKS["delivery-b"])  # an uploader's hidden folder: never
    sensor = setup["defs"].resolve_sensor_def("delivery_inbox")
    resources = {"inbox": DeliveryInbox(path=str(inbox))}

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        def evaluate(cursor):
            return sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources))

        half = evaluate(None)
        assert not half.run_requests and not half.dynamic_partitions_requests and half.skip_reason

        (uploading / READY_MARKER).write_text("")
        first = evaluate(half.cursor)
        assert [(r.run_key, r.partition_key) for r in first.run_requests] == [("delivery-1", "delivery-1")]
        (added,) = first.dynamic_partitions_requests
        assert added.partitions_def_name == DELIVERIES.name and list(added.partition_keys) == ["delivery-1"]
        instance.add_dynamic_partitions(added.partitions_def_name, list(added.partition_keys))  # as the daemon does

        again = evaluate(first.cursor)
        assert not again.run_requests and not again.dynamic_partitions_requests

        make_delivery(inbox / "delivery-2", DELIVERY_TRACKS["delivery-b"])
        later = evaluate(again.cursor or first.cursor)
        assert [r.run_key for r in later.run_requests] == ["delivery-2"]
        assert instance.get_dynamic_partitions(DELIVERIES.name) == ["delivery-1"]


def test_materializing_a_partition_is_linernotes_run_on_that_delivery(setup, curated, tmp_path):
    metadata = curated["delivery-a"]
    assert set(metadata) == {"ingest", "shard", "checks"}
    ingest, shard = metadata["ingest"], metadata["shard"]
    # the ingest counts: every input row accepted or rejected, by reason
    assert (ingest["tracks.input"], ingest["tracks.accepted"], ingest["tracks.rejected"]) == (2, 2, 0)
    assert (ingest["files.input"], ingest["files.accepted"]) == (2, 2)
    assert ingest["counts"]["tracks"]["rejected_by_reason"] == {}
    assert ingest["status"] == "ran" and ingest["whole_run_id"] == shard["whole_run_id"]
    assert Path(ingest["data_docs"]).is_file() and ingest["data_docs"].endswith(".html")
    with LineageStore(setup["workspace"].store_url) as store:
        ingest_run = store.get_run(ingest["run_id"])
        assert ingest_run["kind"] == "ingest" and ingest_run["parent_run_id"] == ingest["whole_run_id"]
        assert ingest_run["output_ids"]["catalog"] == ingest["catalog_id"] == shard_input_catalog(store, shard)
        assert ingest[REGISTRY_KEY] == _registry_id(store)

    assert metadata["checks"] == {"delivery_expectations": True, "curated_expectations": True}

    delivery = setup["inbox"] / "delivery-a"
    done = subprocess.run([str(LINERNOTES), "run", str(setup["spec"]), "--set", f"delivery={delivery}",
                           "--workdir", str(tmp_path / "cli-work"), "--json"], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    assert done.returncode == 0, done.stderr[-3000:]
    cli = json.loads(done.stdout.strip().splitlines()[-1])
    assert shard["dataset_id"] == cli["stages"][1]["output_ids"]["dataset"]
    assert shard["dataset_id"] != curated["delivery-b"]["shard"]["dataset_id"]  # the partition's own delivery
    assert shard["accepted"] == 2 and shard["segments"] == cli["stages"][1]["counts"]["segments"]

    # materializing again is a cached re-run: same dataset, no new stage Run
    with LineageStore(setup["workspace"].store_url) as store:
        runs = len([r for r in store.list_runs() if r["kind"] != "run"])
    again = materialize(setup, "delivery-a")
    assert again["ingest"]["status"] == again["shard"]["status"] == "cached"
    assert again["shard"]["dataset_id"] == shard["dataset_id"]
    # a subset: shard alone reads the catalog of its own delivery's ingest (cached), not the workspace's newest
    # (delivery-b was curated after delivery-a)
    assets, instance, resources = assets_of(setup["defs"]), setup["instance"], setup["resources"]
    alone = dg.materialize([assets], selection=["shard"], partition_key="delivery-a", instance=instance,
                           resources=resources)
    (event,) = alone.get_asset_materialization_events()
    assert event.asset_key == dg.AssetKey("shard") and event.materialization.metadata["dataset_id"].value == \
        shard["dataset_id"]
    with LineageStore(setup["workspace"].store_url) as store:
        assert len([r for r in store.list_runs() if r["kind"] != "run"]) == runs

    # a partition whose folder has no _READY marker fails before any work, saying so
    instance.add_dynamic_partitions(DELIVERIES.name, ["delivery-missing"])
    with pytest.raises(ValueError, match=f"delivery-missing/{READY_MARKER}; a delivery is curated once"):
        dg.materialize([assets], partition_key="delivery-missing", instance=instance, resources=resources)


def test_the_schedule_recurates_only_after_an_opt_out_and_only_the_delivery_holding_it(setup, curated):
    schedule = setup["defs"].resolve_schedule_def("opt_out_recuration")
    instance = setup["instance"]

    def evaluate():
        context = dg.build_schedule_context(instance=instance, resources={"workspace": setup["resources"]["workspace"]})
        return schedule(context)

    before = evaluate()
    assert isinstance(before, dg.SkipReason) and "unchanged" in before.skip_message

    isrc, _ = DELIVERY_TRACKS["delivery-b"]["c"]
    add_opt_out(setup["workspace"], "isrc", isrc, "the rights holder withdrew it")
    after = evaluate()
    assert [r.partition_key for r in after] == ["delivery-b"]  # delivery-a holds no recording the opt-out names

    recurated = materialize(setup, "delivery-b")
    ingest = recurated["ingest"]
    assert ingest["status"] == "ran" and ingest["tracks.rejected_by_reason.opted_out"] == 1
    assert ingest["tracks.accepted"] == 0 and ingest[REGISTRY_KEY] != curated["delivery-b"]["ingest"][REGISTRY_KEY]
    settled = evaluate()
    assert isinstance(settled, dg.SkipReason) and "none of them holds" in settled.skip_message


def shard_input_catalog(store: LineageStore, shard: dict) -> str:
    return store.get_run(shard["run_id"])["inputs"]["catalog"]


def _registry_id(store: LineageStore) -> str:
    from provenance.policy import OptOutRegistry

    return OptOutRegistry.from_rows(store.list_opt_outs()).content_id()



def test_the_shared_instance_config_runs_on_postgresql_and_the_dev_one_on_sqlite(postgres_url, tmp_path, monkeypatch):
    from dagster._core.storage.event_log.sqlite import SqliteEventLogStorage
    from dagster_postgres import PostgresEventLogStorage

    @dg.asset(partitions_def=DELIVERIES)
    def probe() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"tracks.accepted": 2})

    for name, storage in (("dagster.yaml", PostgresEventLogStorage), ("dev.yaml", SqliteEventLogStorage)):
        home = tmp_path / name.removesuffix(".yaml")
        home.mkdir()
        (home / "dagster.yaml").write_text((ROOT / "infra" / "dagster" / name).read_text())
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        url = urlparse(postgres_url)  # postgresql+psycopg://user@127.0.0.1:port/database, trust authentication
        for key, value in {"HOST": url.hostname, "PORT": str(url.port), "DB": url.path.lstrip("/"),
                           "USERNAME": url.username, "PASSWORD": ""}.items():
            monkeypatch.setenv(f"DAGSTER_PG_{key}", value)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert isinstance(instance.event_log_storage, storage)
            if name == "dagster.yaml":
                assert instance.run_coordinator.__class__.__name__ == "QueuedRunCoordinator"
            assert not instance.telemetry_enabled
            instance.add_dynamic_partitions(DELIVERIES.name, ["delivery-a"])
            assert dg.materialize([probe], instance=instance, partition_key="delivery-a").success
            (record,) = instance.fetch_materializations(dg.AssetKey("probe"), limit=1).records
            assert record.partition_key == "delivery-a"
            assert record.asset_materialization.metadata["tracks.accepted"].value == 2


def test_make_dagster_serves_on_loopback_with_its_home_and_inbox_in_the_checkout():
    done = subprocess.run(["make", "--no-print-directory", "-n", "dagster"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    commands = done.stdout.replace("\\\n", " ")
    assert "cp infra/dagster/dev.yaml .dagster/dagster.yaml" in commands
    assert f"DAGSTER_HOME={ROOT / '.dagster'}" in commands and f"LINERNOTES_INBOX={ROOT / 'inbox'}" in commands
    assert "/bin/dagster dev --host 127.0.0.1 --port 3000" in " ".join(commands.split())
