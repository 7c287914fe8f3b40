"""Training on stems (``TrainConfig.source = "stems"``, issue 17 item 3): every kept stem of a segment is one example,
labelled by its instrument (or role); a stem clean dropped never appears; a dataset without stems fails before
training, naming the key and the fix."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cleaning.audio import write_audio
from cleaning.mel import MelConfig, log_mel
from cleaning.synthetic_stems import render_songs
from pipelines.stages.clean import CleanConfig, run_clean
from pipelines.stages.shard.stage import ShardConfig, run_shard
from provenance import records
from provenance.store import LineageStore
from provenance.workspace import Workspace
from tests.pipelines.test_shard import _audio_row, _track_row
from training.config import TrainConfig
from training.data import MelBatchStream, shard_statistics
from training.stems import NoStemsError

SR = 16000
MIX = ShardConfig(segment_s=1.0, sample_rate_hz=SR, n_mels=32, n_fft=512, hop_length=160, validation_fraction=0.0,
                  samples_per_shard=3)
STEMS = MIX.model_copy(update={"stems": True})
FRAMES = SR // 160 + 1  # a whole 1-second segment
TINY = dict(steps=3, batch_size=2, crop_frames=32, warmup_steps=1, log_every=1, base_channels=16, channel_mults=(1, 2),
            text_dim=16, text_buckets=64, diffusion_steps=50, num_workers=1, tensorboard=False)


def _catalog(root: Path) -> tuple[Workspace, dict[tuple[str, str, str], np.ndarray]]:
    """Two 2-second songs: synth-000's ``other`` is two instrument stems (Piano, Guitar: halves of it), synth-001's
    ``other`` file is a stem of another song (clean's check_mixture drops it). Mixtures sum the true stems.

    Returns the workspace and (track, role, instrument) → float32 (1, n) audio of every file.
    """
    workspace = Workspace.at(root / "work").ensure()
    files: dict[tuple[str, str, str], np.ndarray] = {}
    for item in render_songs(2, seed=5, duration_s=2.0):
        files[(item.track_id, item.role, "")] = item.audio
    for track_id in ("synth-000", "synth-001"):
        files[(track_id, "mixture", "")] = sum(a for (t, _, _), a in list(files.items()) if t == track_id)
    other = files.pop(("synth-000", "other", ""))
    files[("synth-000", "other", "Piano")] = other * 0.5
    files[("synth-000", "other", "Guitar")] = other * 0.5
    files[("synth-001", "other", "")] = render_songs(1, seed=7, duration_s=2.0, prefix="x")[2].audio
    rows = []
    for (track_id, role, instrument), audio in files.items():
        path = write_audio(root / "audio" / track_id / f"{role}{instrument}.wav", audio, SR)
        rows.append({**_audio_row(track_id, path), "role": role, "instrument": instrument})
    records.write_table(records.to_table([_track_row(t) for t in ("synth-000", "synth-001")], records.TRACK),
                        workspace.catalog_table("tracks"))
    records.write_table(records.to_table(rows, records.AUDIO_FILE), workspace.catalog_table("audio_files"))
    records.write_table(records.to_table([{"license_id": "lic-1", "ai_training": "allowed"}], records.LICENSE),
                        workspace.catalog_table("licenses"))
    return workspace, files


@pytest.fixture(scope="module")
def datasets(ray_local, tmp_path_factory):
    """A mixture-only dataset, then clean (drops synth-001's contaminated ``other``), then a dataset with stems."""
    workspace, files = _catalog(tmp_path_factory.mktemp("stem_songs"))
    mix = run_shard(workspace, MIX)
    clean = run_clean(workspace, CleanConfig(methods=[], num_cpus=2))
    assert clean.dropped_by_reason == {"stem_not_in_mixture": 1}
    return {"workspace": workspace, "files": files, "mix": mix, "stems": run_shard(workspace, STEMS)}


def _train_shards(result) -> list[str]:
    manifest = json.loads((result.dataset_dir / "dataset.json").read_text())
    return [str(result.dataset_dir / name) for name in manifest["shards"]["train"]]


def _mel_config(result) -> MelConfig:
    return MelConfig(**json.loads((result.dataset_dir / "dataset.json").read_text())["config"]["mel"])


def _one_epoch(result, crop_frames: int = FRAMES) -> list[dict]:
    """Every stem example of the dataset's train shards once (batch 1, no shuffle), as dicts."""
    paths, mel_config = _train_shards(result), _mel_config(result)
    stats = shard_statistics(paths, "stems", mel_config)
    stream = MelBatchStream(paths, stats.mel_mean, stats.mel_std, crop_frames, mel_config.log_floor, batch_size=1,
                            seed=0, samples_per_epoch=stats.num_samples, shuffle_buffer=1, source="stems",
                            mel_config=mel_config)
    out = []
    for batch in stream:
        out.append({"key": batch["key"][0], "text": batch["text"][0], "meta": batch["meta"][0],
                    "instrument": batch["cond"]["instrument"][0],
                    "mel": batch["mel"][0].numpy() * stats.mel_std + stats.mel_mean})
        if len(out) == stats.num_samples:
            return out
    raise AssertionError("the stream ended")


def test_each_kept_stem_of_each_segment_is_one_example_labelled_by_instrument_or_role(datasets):
    examples = _one_epoch(datasets["stems"])
    labels = Counter((e["meta"]["track_id"], e["instrument"]) for e in examples)
    # 2 one-second segments per song; synth-000's other is two instruments, synth-001's other was dropped
    assert labels == {("synth-000", label): 2 for label in ("Bass", "Drums", "Guitar", "Piano", "Vocals")} | {
        ("synth-001", label): 2 for label in ("Bass", "Drums", "Vocals")}
    assert len({e["key"] for e in examples}) == len(examples) == 16
    for e in examples:
        track_text = records.conditioning_text(_track_row(e["meta"]["track_id"]))
        assert e["text"] == f"Instrument: {e['instrument']}. {track_text}"
        assert e["mel"].shape == (32, FRAMES) and e["mel"].dtype == np.float32
        assert e["key"] == f"{records.sample_key(e['meta']['segment_id'])}.{e['meta']['stem']['member'][:-5]}"
    piano = next(e for e in examples if e["instrument"] == "Piano")
    assert piano["meta"]["stem"] == {"role": "other", "instrument": "Piano", "member": "other.piano.flac"}
    assert "stems" not in piano["meta"]


def test_a_stem_clean_dropped_never_appears(datasets):
    examples = _one_epoch(datasets["stems"])
    assert not [e for e in examples if e["meta"]["track_id"] == "synth-001" and e["meta"]["stem"]["role"] == "other"]


def test_a_stem_examples_mel_is_the_stems_not_the_mixtures(datasets):
    """The loaded mel is log_mel of the stem's segment (up to PCM-16 and float16 rounding), far from the mixture's."""
    files, mel_config = datasets["files"], _mel_config(datasets["stems"])
    checked = [e for e in _one_epoch(datasets["stems"])
               if e["meta"]["track_id"] == "synth-000" and e["instrument"] in ("Vocals", "Bass")]
    assert len(checked) == 4
    for e in checked:
        start = e["meta"]["start_sample"]
        stem = files[("synth-000", e["meta"]["stem"]["role"], "")][:, start:start + SR]
        mixture = files[("synth-000", "mixture", "")][:, start:start + SR]
        assert np.mean(np.abs(e["mel"] - log_mel(stem, mel_config))) < 0.05
        assert np.mean(np.abs(e["mel"] - log_mel(mixture, mel_config))) > 0.5


def test_source_stems_on_a_mixture_only_dataset_fails_before_training(datasets):
    with pytest.raises(NoStemsError, match=r"source='stems'.*shard with `stems: true`"):
        shard_statistics(_train_shards(datasets["mix"]), "stems", _mel_config(datasets["mix"]))
    from pipelines.stages.train import run_train

    workspace = datasets["workspace"]
    with pytest.raises(NoStemsError, match=rf"dataset {datasets['mix'].dataset_id} has none: shard with `stems: true`"):
        run_train(workspace, TrainConfig(**TINY, source="stems"), dataset_id=datasets["mix"].dataset_id)
    with LineageStore(workspace.store_url) as store:
        assert store.list_runs("train") == []  # refused before any Run was registered


def test_source_is_a_config_key_of_the_train_stage_cache_key():
    from pipelines.stage import cache_key, config_sha256
    from pipelines.stages.train import TRAIN

    mixture, stems = TrainConfig(**TINY), TrainConfig(**TINY, source="stems")
    assert mixture.source == "mixture" and TrainConfig(**mixture.to_dict()) == mixture
    inputs = {"dataset": "ds-x"}
    assert cache_key(TRAIN, mixture, inputs) != cache_key(TRAIN, stems, inputs)
    assert config_sha256(TRAIN, mixture) != config_sha256(TRAIN, stems)
    with pytest.raises(ValueError, match="source"):
        TrainConfig(**TINY, source="vocals")


def test_a_short_train_run_on_stems_finishes(datasets):
    from pipelines.stages.train import run_train

    result = run_train(datasets["workspace"], TrainConfig(**TINY, source="stems"),
                       dataset_id=datasets["stems"].dataset_id)
    assert result.status == "ran" and result.step == TINY["steps"] and result.checkpoint_id
    assert len(result.losses) == TINY["steps"] and all(np.isfinite(result.losses))
    import torch

    state = torch.load(result.checkpoint_path, map_location="cpu", weights_only=True)
    assert state["config"]["source"] == "stems" and state["dataset_id"] == datasets["stems"].dataset_id


def test_a_run_spec_training_on_stems_of_a_mixture_only_shard_is_refused_before_any_work(tmp_path):
    from pipelines.config import ConfigError
    from pipelines.runspec import parse_spec

    shard = {"segment_s": 1.0, "sample_rate_hz": SR}
    with pytest.raises(ConfigError, match=r"stages\.train\.source: 'stems' .*shard with `stems: true`"):
        parse_spec({"stages": {"shard": shard, "train": {"source": "stems"}}}, base_dir=tmp_path)
    spec = parse_spec({"stages": {"shard": {**shard, "stems": True}, "train": {"source": "stems"}}}, base_dir=tmp_path)
    assert spec.stages["train"].source == "stems"
    assert parse_spec({"stages": {"shard": shard, "train": {}}}, base_dir=tmp_path).stages["train"].source == "mixture"
