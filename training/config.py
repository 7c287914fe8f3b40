"""The training stage's config: one frozen, typed object, saved inside every checkpoint.

Defaults are a CPU demo (200 steps of batch 8 over 128-frame crops, a ~0.5 M-parameter U-Net) that
trains in well under three minutes on two cores; a GPU run raises ``steps``, ``batch_size``,
``base_channels`` and ``num_workers``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from provenance.records import canonical_json, sha256_hex


class TrainConfig(BaseModel):
    """Hyper-parameters of one diffusion training run.

    Unknown keys and mutation raise (``extra="forbid"``, ``frozen=True``); every check names the key
    and the fix. ``sha256()`` identifies the config in the Checkpoint record.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # optimisation
    steps: int = Field(200, description="optimizer steps (the loop counts steps, not epochs)")
    batch_size: int = Field(8, description="segments per step per worker")
    learning_rate: float = Field(1e-3, description="peak AdamW learning rate")
    min_learning_rate: float = Field(1e-4, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(20, description="linear warm-up steps from 0 to learning_rate; when not given, "
                                              "min(20, steps // 10)")
    weight_decay: float = Field(0.0, description="AdamW decoupled weight decay")
    grad_clip: float = Field(1.0, description="max global gradient L2 norm; 0 disables clipping")
    ema_decay: float = Field(0.999, description="EMA decay ceiling (the decay warms up, see train.py)")
    seed: int = Field(0, description="seeds model init, data order, crops, noise and timesteps")
    # data
    crop_frames: int = Field(128, description="mel frames per training example (random crop / pad)")
    shuffle_buffer: int = Field(256, description="samples held by the streaming shuffle buffer")
    source: Literal["mixture", "stems"] = Field(
        "mixture", description="what one training example is: 'mixture', a segment's mixture mel; 'stems', each "
                               "kept stem of each segment (a dataset sharded with stems: true), its mel computed "
                               "from the stem, its text 'Instrument: <instrument or role>. <track text>' and its "
                               "instrument condition the same label (training/stems.py)")
    # model
    base_channels: int = Field(64, description="channels of the U-Net's first level (≥ n_mels avoids a bottleneck)")
    channel_mults: tuple[int, ...] = Field((1, 2, 2), description="channel multiplier per U-Net level")
    text_dim: int = Field(64, description="width of the text embedding")
    text_buckets: int = Field(2048, description="hash buckets of the text encoder's vocabulary")
    # diffusion
    diffusion_steps: int = Field(1000, description="DDPM timesteps T")
    beta_schedule: Literal["linear", "cosine"] = Field("cosine", description="noise schedule")
    beta_start: float = Field(1e-4, description="first beta of the linear schedule")
    beta_end: float = Field(0.02, description="last beta of the linear schedule")
    prediction: Literal["epsilon", "v", "flow"] = Field(
        "v", description="network target: the noise ε (Ho et al. 2020), v (Salimans & Ho 2022), or the "
                         "rectified-flow velocity (Liu et al. 2023); see training/parameterization.py")
    cond_dropout: float = Field(0.1, description="probability of training on the null (empty) text")
    # resources and logging
    num_workers: int = Field(1, description="Ray Train workers (data-parallel ranks)")
    use_gpu: bool = Field(False, description="one GPU per Ray Train worker")
    num_loader_workers: int = Field(0, description="torch DataLoader worker processes per rank")
    log_every: int = Field(20, description="report the mean loss every this many steps")
    checkpoint_every: int = Field(0, description="also checkpoint every this many steps; 0: only at the end")
    # model, conditioning and sampling (issue 5a)
    attention_levels: tuple[int, ...] = Field(
        (-1,), description="U-Net levels with self-attention (negative: from the lowest resolution); "
                           "non-empty also attends in the middle; [] disables attention")
    attention_heads: int = Field(4, description="heads per attention block (must divide the attended widths)")
    musical_conditioning: bool = Field(True, description="condition on BPM, key, instrument and duration "
                                                         "from the sample json (training/conditioning.py)")
    text_encoder: Literal["hashed", "pretrained"] = Field(
        "hashed", description="'hashed': bag-of-words trained with the model; 'pretrained': a frozen "
                              "transformers encoder (T5, CLAP) from the local folder text_encoder_path")
    text_encoder_path: str | None = Field(None, description="local folder of the pretrained text encoder")
    sampler: Literal["ddim", "ddpm", "euler", "heun"] | None = Field(
        None, description="default sampler of generate/evaluate; None: ddim for epsilon/v, heun for flow")
    sample_steps: int = Field(50, description="default sampler steps of generate/evaluate")
    guidance_scale: float = Field(3.0, description="default classifier-free guidance scale (1: none)")
    # trainer: storage, resume, data epochs, precision, logging (issue 5b)
    storage_path: str | None = Field(
        None, description="where Ray Train keeps run state and checkpoints: a local folder or a pyarrow "
                          "filesystem URI (s3://bucket/runs, gs://bucket/runs, file:///abs/path); None: the "
                          "workspace's ray_results")
    samples_per_epoch: int = Field(0, description="samples of one data epoch over all readers; 0: the train "
                                                  "shards' sample count (epochs bound reshuffling and resume cost)")
    num_checkpoints_kept: int = Field(2, description="Ray Train checkpoints kept in storage (the newest)")
    max_failures: int = Field(0, description="worker-group restarts from the latest checkpoint after a failure")
    bf16: bool = Field(True, description="bfloat16 autocast of the forward pass on GPU (ignored on CPU)")
    tensorboard: bool = Field(True, description="rank 0 writes TensorBoard logs to <storage>/<run>/tensorboard")

    @field_validator("steps", "batch_size", "crop_frames", "base_channels", "text_dim", "text_buckets",
                     "diffusion_steps", "num_workers", "log_every", "shuffle_buffer", "num_checkpoints_kept")
    @classmethod
    def _positive_int(cls, value: int, info: Any) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value

    @field_validator("warmup_steps", "num_loader_workers", "seed", "checkpoint_every", "samples_per_epoch",
                     "max_failures")
    @classmethod
    def _non_negative_int(cls, value: int, info: Any) -> int:
        if value < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {value}")
        return value

    @field_validator("learning_rate", "beta_start", "beta_end")
    @classmethod
    def _positive_float(cls, value: float, info: Any) -> float:
        if not value > 0:
            raise ValueError(f"{info.field_name} must be > 0, got {value}")
        return value

    @field_validator("min_learning_rate", "weight_decay", "grad_clip")
    @classmethod
    def _non_negative_float(cls, value: float, info: Any) -> float:
        if not value >= 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {value}")
        return value

    @field_validator("cond_dropout", "ema_decay")
    @classmethod
    def _unit_interval(cls, value: float, info: Any) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{info.field_name} must be in [0, 1), got {value}")
        return value

    @field_validator("channel_mults")
    @classmethod
    def _channel_mults(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(m < 1 for m in value):
            raise ValueError(f"channel_mults must be a non-empty list of integers >= 1, got {list(value)}")
        return value

    @field_validator("storage_path")
    @classmethod
    def _storage_path(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and value.split("://", 1)[0] not in ("s3", "gs", "gcs", "file", "hdfs",
                                                                                     "abfs", "abfss"):
            raise ValueError(f"storage_path {value!r}: the scheme must be one pyarrow.fs opens (s3, gs, file, hdfs, "
                             "abfs) or none for a local folder")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_warmup(cls, data: Any) -> Any:
        """A short run (``steps`` < 200) without an explicit ``warmup_steps`` warms up for a tenth of it."""
        if isinstance(data, dict) and data.get("warmup_steps") is None and isinstance(data.get("steps"), int):
            data = {**data, "warmup_steps": min(20, data["steps"] // 10)}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be <= steps ({self.steps}): "
                             "lower warmup_steps for a short run")
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(f"min_learning_rate ({self.min_learning_rate}) must be <= learning_rate "
                             f"({self.learning_rate})")
        if self.beta_schedule == "linear" and not self.beta_start < self.beta_end < 1.0:
            raise ValueError(f"linear schedule needs beta_start < beta_end < 1, got beta_start="
                             f"{self.beta_start}, beta_end={self.beta_end}")
        levels = len(self.channel_mults)
        if any(not -levels <= level < levels for level in self.attention_levels):
            raise ValueError(f"attention_levels {list(self.attention_levels)} must index the {levels} levels of "
                             f"channel_mults (0..{levels - 1} or negative)")
        for level in {level % levels for level in self.attention_levels}:
            width = self.base_channels * self.channel_mults[level]
            if self.attention_heads < 1 or width % self.attention_heads:
                raise ValueError(f"attention_heads ({self.attention_heads}) must divide the width {width} of "
                                 f"attended level {level}: change attention_heads or attention_levels")
        if self.text_encoder == "pretrained" and not self.text_encoder_path:
            raise ValueError("text_encoder='pretrained' needs text_encoder_path: a local folder with the model "
                             "and tokenizer saved by transformers' save_pretrained")
        sampler_ok = {"epsilon": ("ddim", "ddpm"), "v": ("ddim", "ddpm"), "flow": ("euler", "heun")}[self.prediction]
        if self.sampler is not None and self.sampler not in sampler_ok:
            raise ValueError(f"sampler {self.sampler!r} does not fit prediction={self.prediction!r}: use one of "
                             f"{list(sampler_ok)}")
        if self.sample_steps < 1 or (self.prediction != "flow" and self.sample_steps > self.diffusion_steps):
            raise ValueError(f"sample_steps must be in [1, diffusion_steps={self.diffusion_steps}], "
                             f"got {self.sample_steps}")
        if not (self.guidance_scale >= 0 and self.guidance_scale < float("inf")):
            raise ValueError(f"guidance_scale must be finite and >= 0, got {self.guidance_scale}")
        if self.base_channels % 8:
            raise ValueError(f"base_channels must be a multiple of 8 (GroupNorm with 8 groups), "
                             f"got {self.base_channels}")
        return self

    @property
    def default_sampler(self) -> str:
        """``sampler``, or the default for the prediction: ``ddim`` for epsilon/v, ``heun`` for flow."""
        return self.sampler or ("heun" if self.prediction == "flow" else "ddim")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); ``TrainConfig(**d)`` restores it."""
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        """Hex sha256 of the canonical JSON (sorted keys, no whitespace) of every field."""
        return sha256_hex(canonical_json(self.to_dict()))
