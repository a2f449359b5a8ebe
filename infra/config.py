"""Typed configuration shared by every side of m2d: cluster profiles, stage recipes, runs.

A *cluster profile* (``clusters/NAME.yaml``) says where and how to run; a *stage recipe*
(pretrain or SFT) says what to train. The orchestrator resolves both, plus ``--set``
overrides, into one :class:`RunConfig`, which travels to the workers as JSON and is saved
with every run. Everything is validated here, once: unknown keys are rejected by name and
cross-field checks name the key to change.

Secrets never live in these models: credentials come from the environment of the
process that needs them, and the validators refuse values that look like credentials.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mask2dit.policy import DEFAULT_POLICY, resolve_policy  # pure Python: validating needs no torch

Stage = Literal["pretrain", "sft"]
STAGES: tuple[Stage, ...] = ("pretrain", "sft")
Precision = Literal["bf16", "fp16", "fp32"]
Offload = Literal["none", "cpu"]

# Environment variable names that carry credentials; Ray shows runtime_env in its
# dashboard and logs, so such variables must reach workers another way.
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|PRIVATE|CREDENTIAL|API_KEY")


class KeyProblem(ValueError):
    """A cross-field check failed; ``key`` is the dotted key (relative to the model) to fix."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class _Strict(BaseModel):
    # inf and nan are never a right value of a setting (a learning rate of inf trains nothing)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def looks_secret(name: str) -> bool:
    """True for an environment variable name that conventionally holds a credential."""
    return bool(_SECRET_NAME.search(name.upper()))


# A URL's userinfo, anywhere in a value ("--index-url https://u:p@host/simple" included):
# a token alone in the user part is as much a credential as a password.
_USERINFO = re.compile(r"[A-Za-z][\w+.-]*://[^/\s?#@]*@")


def _reject_userinfo(uri: str) -> str:
    """Refuse URLs with userinfo (``scheme://user:password@host``, ``scheme://token@host``):
    credentials belong in the environment, where nothing m2d saves or logs shows them.
    The value itself is never quoted back."""
    if _USERINFO.search(uri):
        raise ValueError(
            "must not contain a password or any user@ in a URL; give credentials through "
            "the environment (AWS_* or storage.credentials_file for S3, "
            "MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN for MLflow, PIP_INDEX_URL on the "
            "cluster for pip)"
        )
    return uri


def _reject_userinfo_in(value: Any) -> Any:
    """``_reject_userinfo`` over a string, or every string of a list (None passes)."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str):
            _reject_userinfo(item)
    return value


class RayConfig(_Strict):
    """How the driver reaches Ray."""

    address: str = Field(
        "local",
        description="'local' starts Ray inside the launching process; otherwise the Ray Jobs "
        "(dashboard) address of a running cluster, e.g. http://head-node:8265.",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if value == "local" or value.startswith(("http://", "https://")):
            return _reject_userinfo(value)
        raise ValueError(
            "must be 'local' or the Ray dashboard address http(s)://HOST:8265 "
            "(the Jobs API does not use ray:// client addresses)"
        )


class WorkersConfig(_Strict):
    """The Ray Train workers: one DeepSpeed process per worker."""

    num_workers: int = Field(ge=1, description="Data-parallel worker processes in all.")
    nodes: int = Field(1, ge=1, description="Machines the workers are spread over.")
    gpus_per_worker: int = Field(0, ge=0, description="0 (CPU workers) or 1.")
    cpus_per_worker: int = Field(1, ge=1, description="CPU cores reserved per worker.")
    gpu_type: str | None = Field(
        None,
        description="Ray accelerator type the workers need, as Ray labels nodes by the GPU "
        "model it detects: A100, H100, H200, L40S, A10G... (not A100-80G: memory size is "
        "plan.gpu_memory_gib).",
    )
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray placement strategy of the workers: PACK fills each node before the "
        "next (GPU nodes), SPREAD/STRICT_SPREAD put them on different nodes.",
    )

    @model_validator(mode="after")
    def _resources(self) -> WorkersConfig:
        if self.gpus_per_worker > 1:
            raise KeyProblem(
                "gpus_per_worker",
                "a DeepSpeed worker drives one GPU; set gpus_per_worker: 1 and raise num_workers",
            )
        if self.num_workers % self.nodes:
            raise KeyProblem(
                "num_workers",
                f"{self.num_workers} workers cannot be spread evenly over {self.nodes} nodes; "
                "make num_workers a multiple of nodes",
            )
        if self.gpu_type and not self.gpus_per_worker:
            raise KeyProblem("gpu_type", "gpu_type needs gpus_per_worker: 1")
        if self.placement == "STRICT_SPREAD" and self.num_workers != self.nodes:
            raise KeyProblem(
                "placement",
                "STRICT_SPREAD puts one worker per node: set nodes equal to num_workers",
            )
        if self.placement == "STRICT_PACK" and self.nodes != 1:
            raise KeyProblem("placement", "STRICT_PACK puts every worker on one node: nodes: 1")
        return self

    @property
    def resources_per_worker(self) -> dict[str, float]:
        """The Ray resources one worker reserves (its GPU label aside: Ray adds that)."""
        resources: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            resources["GPU"] = self.gpus_per_worker
        return resources

    @property
    def workers_per_node(self) -> int:
        """Workers placed on each node."""
        return self.num_workers // self.nodes


class DeepSpeedConfig(_Strict):
    """DeepSpeed ZeRO settings; the DeepSpeed JSON is derived from these in one place."""

    zero_stage: Literal[2, 3] = Field(2, description="ZeRO stage: 2 (the paper's) or 3.")
    offload_optimizer: Offload = Field("none", description="Keep optimizer state on the CPU.")
    offload_param: Offload = Field("none", description="Keep parameters on the CPU (ZeRO-3).")
    micro_batch_per_gpu: int = Field(1, ge=1, description="Samples per worker per forward.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    precision: Precision = Field(
        "bf16",
        description="Training dtype of the transformer: bf16 or fp16 on GPUs; fp32 or bf16 "
        "on CPU workers (bf16 there is slow but takes the GPU's dtype path).",
    )
    activation_checkpointing: bool = Field(True, description="Recompute each block's activations.")

    @model_validator(mode="after")
    def _offload(self) -> DeepSpeedConfig:
        if self.offload_param != "none" and self.zero_stage != 3:
            raise KeyProblem("offload_param", "parameter offload needs zero_stage: 3")
        return self


class StorageConfig(_Strict):
    """Where checkpoints, configs and samples go. Credentials come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, instance roles, or the
    credentials file named here)."""

    root: str = Field(description="Local path, shared absolute path, or s3://bucket/prefix.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto...).")
    region: str | None = Field(None, description="Object-store region.")
    credentials_file: str | None = Field(
        None, description="Path, on every node, of an AWS-style credentials file."
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _reject_userinfo_in(value)

    @field_validator("root")
    @classmethod
    def _root(cls, value: str) -> str:
        scheme = urlsplit(value).scheme if "://" in value else ""
        if scheme not in ("", "file", "s3"):
            raise ValueError(
                f"scheme {scheme!r} is not supported; use a path or s3://bucket/prefix"
            )
        if not value.strip():
            raise ValueError("must not be empty")
        return _reject_userinfo(value)

    @property
    def is_shared(self) -> bool:
        """True where every node sees the same files (object store or absolute path)."""
        return self.root.startswith(("s3://", "/", "file:///"))


class TrackingConfig(_Strict):
    """MLflow tracking. A token, if the server needs one, comes from MLFLOW_TRACKING_TOKEN."""

    uri: str = Field(description="MLflow tracking URI: sqlite:///path.db, http(s)://host:port...")
    experiment: str = Field("m2d", min_length=1, description="MLflow experiment name.")

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return _reject_userinfo(value)


class FaultToleranceConfig(_Strict):
    """Restarts and checkpoint cadence."""

    max_failures: int = Field(0, ge=-1, description="Worker-group restarts; -1 for unlimited.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(
        3,
        ge=1,
        description="Checkpoints kept per run (the latest K; 2 at least, in case the newer "
        "turns out incomplete).",
    )
    storage_retry_s: float = Field(
        300.0,
        ge=0,
        description="Seconds a checkpoint's upload, manifest or resume download keeps "
        "retrying a storage that fails (backoff 1 s doubling to 30 s) before the run stops "
        "with one line; a restart (max_failures) retries as long again.",
    )


class NotifyConfig(_Strict):
    """Where a run's state changes are posted (started, checkpoint, restarted, finished,
    failed: ``infra/notify.py``). A webhook URL carries its own credential (Slack's and
    most chat services' do), so it comes from the environment, like every secret."""

    webhook_env: str | None = Field(
        None,
        description="Environment variable holding the webhook URL (e.g. M2D_WEBHOOK_URL); "
        "unset or empty: no posts. The job's driver reads it (a remote job: set it in the "
        "cluster's environment, as credentials are).",
    )
    timeout_s: float = Field(5.0, gt=0, le=60, description="Seconds one post may take.")


class ModelConfig(_Strict):
    """Where the CogVideoX weights come from."""

    source: str = Field(
        description="A built-in model built from config (nothing downloaded): 'tiny' (tests "
        "and demos) or 'toy' (learns the toy world on 2 CPU cores); or a diffusers CogVideoX "
        "folder: local path or s3:// URI."
    )

    text_tokens: int = Field(
        226, ge=1, description="T5 tokens per scene prompt (CogVideoX: 226; pad or truncate)."
    )

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be 'tiny', 'toy' or a diffusers folder path/URI")
        return _reject_userinfo(value)


class DataConfig(_Strict):
    """Training data: one manifest per stage (local path or s3:// URI), and optionally the
    stage's latents precomputed from it by `m2d data precompute`, read instead of decoding."""

    pretrain: str | None = Field(
        None, description="Pre-training manifest of single clips (CSV, JSONL or Parquet)."
    )
    sft: str | None = Field(None, description="SFT manifest of ordered shot groups (JSON/JSONL).")
    pretrain_latents: str | None = Field(
        None,
        description="Folder (or s3:// prefix) of pre-training latents written by `m2d data "
        "precompute --stage pretrain`; when set, training reads it instead of decoding videos.",
    )
    sft_latents: str | None = Field(
        None,
        description="Folder (or s3:// prefix) of SFT latents written by `m2d data precompute "
        "--stage sft`; when set, training reads it instead of decoding videos.",
    )
    pretrain_span: tuple[float, float] = Field(
        (0.05, 0.95),
        description="The part of each pre-training clip its frames are drawn from, as "
        "fractions of its length: the paper's 5%-95% keeps away from cuts at the ends of "
        "Panda-70M clips; [0, 1] for clips that are whole scenes (the toy world's).",
    )
    synthetic: bool = Field(
        False,
        description="Train on seeded random stories and read no files (smoke runs, tests); "
        "the manifests and latents above are then ignored.",
    )
    prefetch: int = Field(
        2,
        ge=0,
        le=64,
        description="Micro-batches each worker reads ahead in a background thread while "
        "the step runs (0: read each batch when the step needs it).",
    )

    @field_validator("pretrain", "sft", "pretrain_latents", "sft_latents")
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        return _reject_userinfo_in(value)

    @field_validator("pretrain_span")
    @classmethod
    def _span(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] < value[1] <= 1:
            raise ValueError(f"{list(value)}: give [start, end] with 0 <= start < end <= 1")
        return value

    def stage_input(self, stage: str) -> tuple[str, str] | None:
        """The key and URI that training ``stage`` reads - its precomputed latents when set,
        else its manifest - or ``None`` when neither is set."""
        for key in (f"{stage}_latents", stage):
            if value := getattr(self, key):
                return key, value
        return None

    def clip_span(self, stage: str) -> tuple[float, float] | None:
        """The part of each clip a stage draws frames from (None: all of it)."""
        return self.pretrain_span if stage == "pretrain" else None


class RuntimeEnvConfig(_Strict):
    """What a remote job runs in. Never put credentials here: Ray displays it."""

    image: str | None = Field(
        None,
        description="Opt-in: a container image for the job (Ray's image_uri, experimental and "
        "podman-based; the nodes must be able to pull it). Default none: the cluster's own "
        "environment, with this checkout's code shipped (ship_code).",
    )
    ship_code: bool = Field(
        True,
        description="Send the submitting checkout's m2d packages with the job (Ray "
        "py_modules), so a remote job runs the code you launched from, on top of the "
        "cluster's installed dependencies.",
    )
    env_vars: dict[str, str] = Field(default_factory=dict, description="Non-secret env vars.")
    pip: list[str] = Field(default_factory=list, description="Extra pip requirements.")

    @field_validator("image", "pip")
    @classmethod
    def _no_userinfo(cls, value: Any) -> Any:
        return _reject_userinfo_in(value)

    @field_validator("env_vars")
    @classmethod
    def _no_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if looks_secret(name):
                raise ValueError(
                    f"{name} looks like a credential; Ray shows runtime_env in its dashboard "
                    "and logs, so set it in the workers' own environment instead"
                )
        return value


class ValidationConfig(_Strict):
    """Stories rendered from the current weights during training, scored and shown in the
    training run's MLflow run at their step (trainer/validation.py). Off by default."""

    every: int = Field(0, ge=0, description="Validate every this many steps; 0: never.")
    prompts: str = Field(
        "eval50",
        description="A prompt file (JSONL, as `m2d sample-batch --prompts` reads) or the "
        "name of a shipped set (eval50).",
    )
    stories: int = Field(2, ge=1, description="How many of its stories (the first ones).")
    seeds: tuple[int, ...] = Field((0,), min_length=1, description="One render per seed.")
    sampling_steps: int = Field(20, ge=1, description="Denoising steps of each render.")
    guidance_scale: float = Field(6.0, ge=0, description="Classifier-free guidance scale.")
    encoder: str | None = Field(
        None,
        description="Encoder scoring the renders' consistency (xclip, clip, dinov2 or "
        "MODULE:FUNCTION); none: contact sheets only.",
    )
    encoder_path: str | None = Field(None, description="The encoder's folder (path or s3://).")

    @field_validator("encoder_path")
    @classmethod
    def _encoder_path(cls, value: str | None) -> str | None:
        return _reject_userinfo_in(value)

    @model_validator(mode="after")
    def _encoder(self) -> ValidationConfig:
        if self.encoder and not self.encoder_path:
            raise KeyProblem("encoder_path", f"encoder {self.encoder} needs its folder")
        return self


class StageRecipe(_Strict):
    """What one training stage does. Defaults are the paper's (docs/method.md §6)."""

    steps: int = Field(10_000, ge=1, description="Optimizer steps.")
    global_batch: int = Field(8, ge=1, description="Samples per optimizer step, all workers.")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(0.03, ge=0, description="AdamW weight decay.")
    eps: float = Field(1e-10, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up, then constant.")
    gradient_clipping: float = Field(
        1.0,
        ge=0,
        description="Gradient-norm clip applied by DeepSpeed; 0 disables. (The reference "
        "release passes 0.05, which never reached DeepSpeed, so it trained unclipped.)",
    )
    extension_prob: float = Field(
        0.0, ge=0, le=1, description="Probability p of an extension step (SFT: 0.5)."
    )
    task_draw: Literal["per_step", "per_sample"] = Field(
        "per_step", description="Draw the task once per step (reference) or per sample."
    )
    num_scenes: int = Field(3, ge=1, description="Scenes per training sample.")
    frames: int = Field(49, ge=1, description="Video frames per scene (4k+1).")
    height: int = Field(480, ge=16, description="Frame height in pixels (multiple of 16).")
    width: int = Field(720, ge=16, description="Frame width in pixels (multiple of 16).")
    mask_policy: str = Field(DEFAULT_POLICY, description="v2, full, isolated, or a block rule.")
    seed: int = Field(0, description="Seed of noise, timesteps, task draws and data order.")
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig, description="Sampling during training (off: every 0)."
    )

    @model_validator(mode="after")
    def _shapes(self) -> StageRecipe:
        if (self.frames - 1) % 4:
            raise KeyProblem("frames", "the CogVideoX VAE needs 4k+1 frames (e.g. 9, 13, 49)")
        for key in ("height", "width"):
            if getattr(self, key) % 16:
                raise KeyProblem(key, "must be a multiple of 16 (VAE 8x, patch 2x)")
        if self.warmup_steps > self.steps:
            raise KeyProblem(
                "warmup_steps",
                f"a warm-up of {self.warmup_steps} steps is longer than the run "
                f"({self.steps} steps); set recipe.warmup_steps to at most {self.steps}",
            )
        if self.extension_prob > 0 and self.num_scenes < 2:
            raise KeyProblem("extension_prob", "extension steps need num_scenes >= 2")
        try:
            resolve_policy(self.mask_policy)
        except ValueError as exc:
            raise KeyProblem("mask_policy", str(exc)) from None
        return self


STAGE_DEFAULTS: dict[Stage, StageRecipe] = {
    "pretrain": StageRecipe(),
    "sft": StageRecipe(extension_prob=0.5),
}


class PlanConfig(_Strict):
    """What `m2d plan` assumes about this cluster's hardware and prices (docs/planner.md)."""

    usd_per_gpu_hour: float | None = Field(
        None, ge=0, description="What one GPU costs per hour; the plan prices the stage with it."
    )
    mfu: float = Field(
        0.35,
        gt=0,
        le=1,
        description="Model FLOPs utilisation the step time assumes: model FLOPs (3 x forward, "
        "recomputation not counted) per second over the GPUs' peak.",
    )
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="Memory per GPU (CPU workers: per worker); default by gpu_type."
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="Dense bf16 peak per GPU in TFLOP/s; default by gpu_type."
    )


class _Placement(_Strict):
    """The sections a profile and a run share."""

    ray: RayConfig = Field(default_factory=RayConfig)
    workers: WorkersConfig
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    storage: StorageConfig
    tracking: TrackingConfig
    fault_tolerance: FaultToleranceConfig = Field(default_factory=FaultToleranceConfig)
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    runtime_env: RuntimeEnvConfig = Field(default_factory=RuntimeEnvConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)

    @model_validator(mode="after")
    def _placement(self) -> _Placement:
        cpu = self.workers.gpus_per_worker == 0
        if cpu and self.deepspeed.precision == "fp16":
            raise KeyProblem(
                "deepspeed.precision",
                "fp16 needs GPU workers (loss scaling); CPU workers train in fp32 or bf16",
            )
        if cpu and "cpu" in (self.deepspeed.offload_optimizer, self.deepspeed.offload_param):
            raise KeyProblem("deepspeed.offload_optimizer", "offload needs GPU workers")
        if self.ray.address == "local" and self.workers.nodes > 1:
            raise KeyProblem(
                "workers.nodes", "a 'local' Ray runs on one node; set ray.address to the cluster"
            )
        if self.workers.nodes > 1 and not self.storage.is_shared:
            raise KeyProblem(
                "storage.root",
                "workers on several nodes need shared storage: an s3:// URI or a shared "
                "absolute path",
            )
        return self


class ClusterProfile(_Placement):
    """One ``clusters/NAME.yaml``: where and how to run, plus per-stage recipe overrides."""

    description: str = Field("", description="One line shown by `m2d cluster list`.")
    extends: str | None = Field(
        None, description="Name of a profile in the same folder (or a path) this one refines."
    )
    stages: dict[Stage, StageRecipe] = Field(
        default_factory=dict,
        description="Recipe keys this cluster changes, per stage (e.g. global_batch).",
    )

    def recipe(self, stage: Stage) -> StageRecipe:
        """The stage recipe: paper defaults, then the keys this profile sets."""
        override = self.stages.get(stage)
        if override is None:
            return STAGE_DEFAULTS[stage]
        changed = override.model_dump(include=override.model_fields_set)
        return StageRecipe.model_validate({**STAGE_DEFAULTS[stage].model_dump(), **changed})


class RunConfig(_Placement):
    """Everything one training run needs, resolved: saved with the run and sent to workers."""

    cluster: str = Field(description="Name of the profile this run came from.")
    stage: Stage
    recipe: StageRecipe
    init_from: str | None = Field(
        None, description="Checkpoint folder whose model weights start this run (SFT)."
    )

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, value: str | None) -> str | None:
        return _reject_userinfo_in(value)

    @model_validator(mode="after")
    def _global_batch(self) -> RunConfig:
        ds, workers = self.deepspeed, self.workers
        product = ds.micro_batch_per_gpu * ds.gradient_accumulation * workers.num_workers
        if product != self.recipe.global_batch:
            raise KeyProblem(
                "recipe.global_batch",
                f"global batch {self.recipe.global_batch} != micro_batch_per_gpu "
                f"{ds.micro_batch_per_gpu} x gradient_accumulation {ds.gradient_accumulation} "
                f"x num_workers {workers.num_workers} = {product}; set "
                f"stages.{self.stage}.global_batch: {product} or change "
                "deepspeed.gradient_accumulation / deepspeed.micro_batch_per_gpu",
            )
        return self


def resolve_run(
    profile: ClusterProfile, cluster: str, stage: Stage, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Profile + the stage's recipe + ``--set`` overrides (a nested dict), validated."""
    data = profile.model_dump(exclude={"description", "extends", "stages"})
    data.update(cluster=cluster, stage=stage, recipe=profile.recipe(stage).model_dump())
    return RunConfig.model_validate(deep_merge(data, overrides or {}))


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``update`` over ``base``, merging nested dicts, replacing everything else."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
