"""The job file as typed, frozen pydantic models: `jobs/*.yaml` -> `JobSpec`.

Every knob of a batch run lives here, with its default, unit and bounds in the field description (the
one place they are documented). Unknown keys are errors (`extra="forbid"`), so a typo fails before any
work starts; `pipeline.jobfile.load_job` turns validation errors into one line naming file and key.

Cross-field rules raise `FieldRuleError(dotted_key, message)` so the error names the exact key that is
wrong (pydantic would otherwise report the enclosing section).

Credentials never appear in a job file: `StorageOptions` holds the NAMES of environment variables, and
`JobSpec.to_manifest()` additionally strips userinfo and query strings from URLs, so the manifest is safe
to write next to the data.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal, Optional, Union
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import field_validator, model_validator

# Qwen2.5-VL: 14-pixel patches merged 2x2, so one visual token covers a 28x28 pixel cell.
IMAGE_FACTOR = 28
PIXELS_PER_TOKEN = IMAGE_FACTOR * IMAGE_FACTOR

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LOOKS_LIKE_ACCESS_KEY = re.compile(r"^(AKIA|ASIA)[A-Z0-9]{16}$")
_SECRET_WORDS = re.compile(r"secret|password|passwd|token|key|credential|signature", re.IGNORECASE)
REDACTED = "***"

NonEmptyStr = Annotated[str, Field(min_length=1)]
ExtraValue = Union[StrictBool, StrictInt, StrictFloat, StrictStr]


class FieldRuleError(ValueError):
    """A cross-field rule failed; `field` is the dotted key (relative to the model raising it) to blame."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class StrictModel(BaseModel):
    """Base of every job-file model: unknown keys are errors and specs are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def redact_url(url: Optional[str]) -> Optional[str]:
    """Drop userinfo (`user:pass@`) and query strings (presigned signatures) from a URL; keep paths."""
    if not url or "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = REDACTED if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# ---------------------------------------------------------------------------------------------------
# Storage


class StorageOptions(StrictModel):
    """How to reach an object store. Credentials are given as environment-variable NAMES only."""

    endpoint_url: Optional[str] = Field(
        None,
        description="S3-compatible endpoint URL (http:// or https://), e.g. http://127.0.0.1:9000 for "
        "MinIO, a Ceph RGW or an R2 account endpoint. None = the provider's default endpoint.",
    )
    region: Optional[str] = Field(
        None, description="Object-store region, e.g. us-east-1 or 'auto' for R2. None = SDK default."
    )
    anonymous: bool = Field(
        False, description="Connect without credentials (public buckets). Excludes key_env/secret_env/token_env."
    )
    key_env: Optional[str] = Field(
        None,
        description="NAME of the environment variable holding the access key id (not the key itself). "
        "None = the SDK's default chain (AWS_ACCESS_KEY_ID, profile, instance metadata).",
    )
    secret_env: Optional[str] = Field(
        None, description="NAME of the environment variable holding the secret access key; set with key_env."
    )
    token_env: Optional[str] = Field(
        None, description="NAME of the environment variable holding a session token (temporary credentials)."
    )
    profile: Optional[str] = Field(None, description="Named profile from the shared AWS config files.")
    extra: dict[str, ExtraValue] = Field(
        default_factory=dict,
        description="Extra keyword arguments for the fsspec filesystem (scalars only), e.g. "
        "{requester_pays: true}. Values under secret-looking keys are redacted from manifests.",
    )
    retry_deadline_s: float = Field(
        60.0, ge=0, le=3600,
        description="Seconds (0-3600) a storage call (listing, Parquet read/write, image read, marker) keeps "
        "retrying transient errors (throttling, 5xx, connection resets, timeouts) with exponential backoff "
        "before it fails as transient; 0 = one attempt (the SDK's own few retries still apply). Permanent "
        "errors (not found, access denied, other 4xx) are never retried.",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_is_http(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value

    @field_validator("key_env", "secret_env", "token_env")
    @classmethod
    def _is_env_name(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return value
        if _LOOKS_LIKE_ACCESS_KEY.match(value) or not _ENV_NAME.match(value):
            # Never echo the value: it may be a pasted secret.
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits, underscore), "
                "not a credential; export the secret and give its variable name here"
            )
        return value

    @model_validator(mode="after")
    def _credentials_consistent(self) -> "StorageOptions":
        if (self.key_env is None) != (self.secret_env is None):
            missing = "secret_env" if self.secret_env is None else "key_env"
            raise FieldRuleError(missing, "key_env and secret_env must be given together")
        if self.token_env is not None and self.key_env is None:
            raise FieldRuleError("token_env", "needs key_env and secret_env as well")
        if self.anonymous and (self.key_env or self.profile):
            raise FieldRuleError("anonymous", "cannot be combined with key_env/secret_env or profile")
        return self

    def redacted(self) -> "StorageOptions":
        """A copy safe to write out: endpoint userinfo and secret-looking `extra` values removed."""
        extra = {k: (REDACTED if _SECRET_WORDS.search(k) else v) for k, v in self.extra.items()}
        return self.model_copy(update={"endpoint_url": redact_url(self.endpoint_url), "extra": extra})


# ---------------------------------------------------------------------------------------------------
# Input / output


class InputColumns(StrictModel):
    """Names of the input columns the pipeline reads; every other column passes through untouched."""

    id: NonEmptyStr = Field("id", description="Column holding each row's unique id (any scalar type).")
    image: NonEmptyStr = Field(
        "image",
        description="Column holding the image(s): bytes, a URL/path string, a {bytes, path} struct, "
        "or a list of these for multi-image questions.",
    )
    question: Optional[NonEmptyStr] = Field(
        "question",
        description="Column holding the question/prompt text; null for jobs that use input.prompt only "
        "(captioning). Empty questions fall back to input.prompt.",
    )

    sampling: Optional[NonEmptyStr] = Field(
        None,
        description="Optional column holding a row's own decoding settings as a JSON object (or struct) with any of "
        "max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop; null = the job's.",
    )
    pruning: Optional[NonEmptyStr] = Field(
        None,
        description="Optional column holding a row's own pruning setting, overriding the job's for that row: its "
        "threshold (pruning.mode glimpse, in (0, 1)) or its keep ratio (fixed_ratio and the other strategies, in (0, 1]); "
        "null = the job's.",
    )

    @model_validator(mode="after")
    def _distinct(self) -> "InputColumns":
        names = [self.id, self.image] + [c for c in (self.question, self.pruning, self.sampling) if c]
        if len(set(names)) != len(names):
            raise FieldRuleError("image", f"the id, image, question, pruning and sampling columns must differ, got {names}")
        return self


class InputSpec(StrictModel):
    """Where the input is (Parquet shards, CSV/JSONL manifests or image files) and how to read it."""

    uri: NonEmptyStr = Field(
        description="The input: a directory/prefix, a single file or a glob, on any fsspec URL "
        "(s3://, gs://, http(s)://, file://) or a plain local path; see format.",
    )
    storage: StorageOptions = Field(
        default_factory=StorageOptions,
        description="Object-store options for the input shards and for images referenced by URL.",
    )
    format: Literal["auto", "parquet", "csv", "jsonl", "images"] = Field(
        "auto", description="What the input is: Parquet shards, CSV or JSON Lines manifests (image paths/URLs + "
        "questions), or a folder/glob of image files (one row per image, id = its relative path, question = "
        "input.prompt). auto: from the URI's suffix, else from what the folder holds (Parquet first).")
    images_per_shard: int = Field(1000, ge=1, le=1_000_000, description="format images: files per shard (a shard is a "
                                  "folder's files, sorted, in parts of this many; the unit of commit and of skip_existing).")
    columns: InputColumns = Field(default_factory=InputColumns, description="Input column names.")
    prompt: Optional[NonEmptyStr] = Field(
        None,
        description="Default prompt, used when there is no question column or a row's question is "
        "empty (captioning). Required when columns.question is null.",
    )
    limit: Optional[int] = Field(None, ge=1, description="Process at most this many rows (rows); None = all.")

    @model_validator(mode="after")
    def _has_a_prompt_source(self) -> "InputSpec":
        if self.columns.question is None and (self.prompt is None or not self.prompt.strip()):
            raise FieldRuleError("prompt", "required when columns.question is null (captioning jobs)")
        if self.format == "images" and not self.prompt:
            raise FieldRuleError("prompt", "required with format images (image files carry no question)")
        return self


class OutputSpec(StrictModel):
    """Where results go. One output row per input row; files are named after the input shards."""

    uri: NonEmptyStr = Field(description="Output directory/prefix on any fsspec URL or a local path.")
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object-store options.")
    rows_per_file: int = Field(
        100_000, ge=1, le=10_000_000, description="Maximum rows per output Parquet file (rows)."
    )
    mode: Literal["overwrite", "skip_existing"] = Field(
        "overwrite",
        description="overwrite: clear previous outputs first; skip_existing: keep shards that already "
        "have a completion marker and process only new ones.",
    )
    report: bool = Field(True, description="Write the run report (_report/report.md with PNGs: keep ratios, throughput, "
                         "errors, kept tokens on sample rows) next to the output at the end of a run.")


# ---------------------------------------------------------------------------------------------------
# Model and pruning


class ModelSpec(StrictModel):
    """Which vision-language model to run and how to load it."""

    base: NonEmptyStr = Field(
        description="Base model: a hub id, a local directory or an object-store URL of a model directory.",
    )
    glimpse_modules: Optional[NonEmptyStr] = Field(
        None,
        description="GlimpsePrune modules (glimpse token, importance predictor): hub id, local directory "
        "or object-store URL. None = the base directory already holds them (or pruning.mode is not glimpse).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight/compute dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto", description="Attention kernel; flash_attention_2 needs CUDA. auto = sdpa."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device; auto = cuda if available.")


class NoPruning(StrictModel):
    """Run the unpruned model (the baseline): every visual token is kept."""

    mode: Literal["none"] = Field("none", description="Strategy tag.")


class GlimpsePruning(StrictModel):
    """GlimpsePrune: keep visual tokens whose predicted importance sigmoid(logit) > threshold."""

    mode: Literal["glimpse"] = Field("glimpse", description="Strategy tag.")
    threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="Keep a token iff sigmoid(importance logit) > threshold (0..1)."
    )
    max_remain_ratio: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="Cap on the kept fraction per row (0..1]; None = no cap."
    )
    min_remain_num: int = Field(1, ge=1, description="Always keep at least this many visual tokens per row.")


class FixedRatioPruning(StrictModel):
    """Keep exactly the top int(keep_ratio * N) tokens by importance (efficiency benchmarks)."""

    mode: Literal["fixed_ratio"] = Field("fixed_ratio", description="Strategy tag.")
    keep_ratio: float = Field(gt=0.0, le=1.0, description="Fraction of visual tokens kept per row, (0, 1].")


def _keep_ratio_field():
    return Field(gt=0.0, le=1.0, description="Fraction of visual tokens kept per row, (0, 1]: exactly max(1, int(keep_ratio * N)) "
                 "over all of a row's images (11.1% = 64 of LLaVA's 576).")


def _layer_field(default: int, what: str):
    return Field(default, ge=0, le=1_000, description=f"Decoder layer (0-based) after which {what} prunes; must be below the "
                 "model's layer count.")


class _StrategyPruning(StrictModel):
    """Fields every pruning strategy other than GlimpsePrune takes."""

    keep_ratio: float = _keep_ratio_field()
    positions: Literal["original", "contiguous"] = Field(
        "original", description="Positions of the kept tokens after pruning: original (their M-RoPE positions) or "
        "contiguous (re-indexed 0..n-1 in the row, as FastV/PDrop do on LLaVA).")


class RandomPruning(_StrategyPruning):
    """Keep a random subset of each row's visual tokens, before the LLM (the zero-overhead reference)."""

    mode: Literal["random"] = Field("random", description="Strategy tag.")
    seed: int = Field(0, ge=0, description="Seed; each row draws from (seed, its shard and row), never from its batch.")


class UniformPruning(_StrategyPruning):
    """Keep a regular lattice of each image's token grid, before the LLM (uniform spatial downsampling)."""

    mode: Literal["uniform"] = Field("uniform", description="Strategy tag.")


class FastVPruning(_StrategyPruning):
    """FastV: keep the visual tokens the last prompt token attends to most at one decoder layer."""

    mode: Literal["fastv"] = Field("fastv", description="Strategy tag.")
    layer: int = _layer_field(1, "FastV")


class PDropPruning(_StrategyPruning):
    """PyramidDrop: FastV's score at several layers, keeping a geometric schedule that ends at keep_ratio."""

    mode: Literal["pdrop"] = Field("pdrop", description="Strategy tag.")
    stage_fractions: list[float] = Field(
        [0.25, 0.5, 0.75], min_length=1, max_length=16,
        description="Ends of the stages as fractions of the model's depth, ascending in (0, 1] (the paper's 8/16/24 of 32).",
    )

    @field_validator("stage_fractions")
    @classmethod
    def _ascending(cls, f: list) -> list:
        if any(not 0.0 < x <= 1.0 for x in f) or any(b <= a for a, b in zip(f, f[1:])):
            raise ValueError(f"must be ascending values in (0, 1], got {f}")
        return f


class DivPrunePruning(_StrategyPruning):
    """DivPrune: keep a maximally diverse subset (greedy max-min cosine distance) before the LLM."""

    mode: Literal["divprune"] = Field("divprune", description="Strategy tag.")


class DartPruning(_StrategyPruning):
    """DART: keep pivot tokens (largest key norm) and the tokens least similar to them, at one decoder layer."""

    mode: Literal["dart"] = Field("dart", description="Strategy tag.")
    layer: int = _layer_field(1, "DART")
    pivots: int = Field(8, ge=1, le=4_096, description="Pivot tokens per row.")


class VisionZipPruning(_StrategyPruning):
    """VisionZip: keep the tokens the vision tower attends to most, merge the rest into a few contextual tokens."""

    mode: Literal["visionzip"] = Field("visionzip", description="Strategy tag.")
    contextual: float = Field(10 / 64, ge=0.0, lt=1.0, description="Share of the kept tokens that are contextual (merged) "
                              "tokens, [0, 1); the paper's 10 of 64 by default; 0 = dominant tokens only.")
    vit_layer: int = Field(-1, ge=-1, le=1_000, description="Vision block whose attention ranks the tokens (0-based); -1 = "
                           "the tower's last full-attention block.")


class CDPrunerPruning(_StrategyPruning):
    """CDPruner: keep the subset of maximal diversity conditioned on relevance to the question (a DPP)."""

    mode: Literal["cdpruner"] = Field("cdpruner", description="Strategy tag.")
    relevance_floor: float = Field(0.1, ge=0.0, le=1.0, description="Relevance of the least relevant token, [0, 1] "
                                   "(0: irrelevant tokens are only picked when diversity is exhausted; 1: plain DPP).")


# Modes whose budget is a keep ratio and that need no glimpse modules (workers.modeling.strategies).
STRATEGY_MODES = ("random", "uniform", "fastv", "pdrop", "divprune", "dart", "visionzip", "cdpruner")
# Modes whose per-row pruning value is a keep ratio (else a threshold).
KEEP_RATIO_MODES = ("fixed_ratio",) + STRATEGY_MODES

PruningSpec = Annotated[
    Union[NoPruning, GlimpsePruning, FixedRatioPruning, RandomPruning, UniformPruning, FastVPruning, PDropPruning,
          DivPrunePruning, DartPruning, VisionZipPruning, CDPrunerPruning],
    Field(discriminator="mode"),
]


class SamplingSpec(StrictModel):
    """Decoding settings (shared by every row)."""

    max_new_tokens: int = Field(256, ge=1, le=32_768, description="Maximum generated tokens per row.")
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus-sampling mass, (0, 1].")
    seed: Optional[int] = Field(None, ge=0, description="Sampling seed (per batch); None = unseeded.")
    top_k: int = Field(0, ge=0, le=1_000_000, description="Sample among the k most likely tokens only; 0 = no limit.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="CTRL repetition penalty over the tokens a row has "
                                      "generated; 1 = off, > 1 discourages repeats.")
    stop: list[NonEmptyStr] = Field([], max_length=16, description="Strings that end a row's answer; the answer is cut "
                                    "before the first (finish_reason stop).")


class RowSamplingSpec(StrictModel):
    """A row's own decoding settings (input.columns.sampling): any of these keys, the rest are the job's."""

    max_new_tokens: Optional[int] = Field(None, ge=1, le=32_768)
    temperature: Optional[float] = Field(None, ge=0.0, le=10.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0, le=1_000_000)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0)
    stop: Optional[list[NonEmptyStr]] = Field(None, max_length=16)


class ChatSpec(StrictModel):
    """How the question becomes the model's prompt."""

    system: Optional[NonEmptyStr] = Field(None, description="System prompt for every row; None = the template's default.")
    template: Optional[NonEmptyStr] = Field(None, description="A Jinja chat template replacing the model's own (inline); "
                                            "it must render the image placeholder and the question.")
    template_file: Optional[NonEmptyStr] = Field(None, description="A file holding the chat template (read when the job "
                                                 "is loaded; relative to the current directory).")

    @model_validator(mode="after")
    def _one_template(self) -> "ChatSpec":
        if self.template and self.template_file:
            raise FieldRuleError("template_file", "give chat.template or chat.template_file, not both")
        return self


# ---------------------------------------------------------------------------------------------------
# Images, batching, resources


class ImageSpec(StrictModel):
    """Decode/resize limits for the CPU image stage."""

    min_pixels: int = Field(
        3_136, ge=PIXELS_PER_TOKEN, description="Lower bound on resized h*w (pixels); >= 784 (one token)."
    )
    max_pixels: int = Field(
        1_003_520,
        ge=PIXELS_PER_TOKEN,
        le=16_384 * PIXELS_PER_TOKEN,
        description="Upper bound on resized h*w (pixels); 1003520 = 1280 visual tokens per image.",
    )
    max_image_bytes: int = Field(
        50 * 1024 * 1024, ge=1, description="Reject encoded images larger than this (bytes)."
    )
    max_source_pixels: int = Field(
        100_000_000,
        ge=1,
        description="Decompression-bomb guard: reject images whose header declares more pixels than this "
        "(pixels), checked before decoding. Pillow independently refuses > 2x Image.MAX_IMAGE_PIXELS.",
    )
    max_images_per_row: int = Field(8, ge=1, le=256, description="Reject rows with more images (images).")

    @model_validator(mode="after")
    def _pixel_bounds(self) -> "ImageSpec":
        if self.min_pixels > self.max_pixels:
            raise FieldRuleError(
                "max_pixels", f"must be >= min_pixels (got max_pixels={self.max_pixels}, min_pixels={self.min_pixels})"
            )
        return self


class BatchingSpec(StrictModel):
    """Token budgets that size the model batches (rows are packed until a budget would be exceeded)."""

    max_batch_tokens: int = Field(
        32_768, ge=1, le=10_000_000,
        description="Raw-token budget per batch for the glimpse (prefill) pass, before pruning (tokens).",
    )
    max_decode_tokens: int = Field(
        65_536, ge=1, le=100_000_000,
        description="KV-cache budget per batch after pruning: sum of kept + prompt + new tokens (tokens).",
    )
    max_rows: int = Field(
        32, ge=1, le=4_096,
        description="Maximum rows per model batch (rows); with the continuous scheduler, rows decoding at once.",
    )
    scheduler: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: rows join the decode batch when the KV budget allows and leave it the step they "
        "finish; static: fixed groups packed by max_decode_tokens that decode until their longest row ends.",
    )
    kv_budget_tokens: Optional[int] = Field(
        None, ge=1, le=10**12,
        description="Continuous scheduler: KV-cache tokens across all layers (rows x cache length x layers, "
        "padding included) the decode batch may hold; None = kv_memory_fraction of the device's free memory.",
    )
    kv_memory_fraction: float = Field(
        0.5, gt=0.0, le=0.95,
        description="Share of the free device memory (after the model is loaded; host memory on CPU) the default "
        "KV budget may use.",
    )


class ResourcesSpec(StrictModel):
    """Ray cluster and actor-pool sizing. `auto` is resolved against the cluster's nodes when the run starts
    (`pipeline.resources`); a request the cluster can never satisfy fails there in one line, before any work."""

    min_actors: int = Field(1, ge=1, le=10_000, description="Minimum model actors in the pool (the run waits for them).")
    max_actors: Union[Annotated[int, Field(ge=1, le=10_000)], Literal["auto"]] = Field(
        "auto",
        description="Maximum model actors in the pool (1-10000); auto = one per GPU on a cluster with GPUs "
        "(as many as its GPUs hold), 1 on CPUs; never below min_actors.",
    )
    num_gpus_per_actor: Union[Annotated[float, Field(ge=0.0, le=16.0)], Literal["auto"]] = Field(
        "auto",
        description="GPUs per model actor (0-16, fractional allowed; 0 = CPU actors); auto = 1 if the cluster "
        "has a GPU and model.device is not 'cpu', else 0.",
    )
    num_cpus_per_actor: Union[Annotated[float, Field(gt=0.0, le=1_024.0)], Literal["auto"]] = Field(
        "auto",
        description="Logical CPUs per model actor (0-1024, fractional allowed); auto = 1 for GPU actors, else "
        "the cluster's whole CPUs minus one, shared by the actors, so the read/write tasks always have a CPU "
        "(a fraction of a CPU each on a cluster under 2 CPUs).",
    )
    ray_address: Optional[NonEmptyStr] = Field(
        None,
        description="Ray cluster to join ('host:port', 'ray://host:port'; 'auto' = whatever cluster runs on this "
        "machine, possibly another user's); None = start a local one, or join RAY_ADDRESS when that is set "
        "(`ray job submit` sets it for the driver).",
    )
    ray_num_cpus: Optional[int] = Field(
        None, ge=1, le=4_096, description="Logical CPUs of a local cluster (only when ray_address is None)."
    )
    blocks_ahead_per_actor: int = Field(
        4, ge=1, le=64,
        description="Blocks handed to each model actor at once, so it never waits for its next input; more uses "
        "more object-store memory. With the continuous scheduler they are all in the actor's one running batch "
        "(a block's rows join while the previous block's still decode).",
    )
    actor_start_timeout_s: int = Field(
        900, ge=10, le=86_400,
        description="Seconds the run waits for its first min_actors model actors (model download and load "
        "included) before it fails with one line; reads start once they are up.",
    )
    accelerator_type: Optional[NonEmptyStr] = Field(
        None, description="Run the model actors only on nodes with this accelerator (Ray's accelerator_type, e.g. "
        "H100, A100, L4); None = any. A cluster with no such node is refused in one line.")

    @field_validator("max_actors", "num_gpus_per_actor", "num_cpus_per_actor", mode="before")
    @classmethod
    def _number_or_auto(cls, value):
        if isinstance(value, bool) or (isinstance(value, str) and value != "auto"):
            raise ValueError(f"expected a number or 'auto', got {value!r}")
        return value

    @model_validator(mode="after")
    def _sizes(self) -> "ResourcesSpec":
        if self.max_actors != "auto" and self.min_actors > self.max_actors:
            raise FieldRuleError(
                "max_actors", f"must be >= min_actors (got max_actors={self.max_actors}, min_actors={self.min_actors})"
            )
        if self.ray_num_cpus is not None and self.ray_address is not None:
            raise FieldRuleError("ray_num_cpus", "only applies to a local cluster (ray_address must be null)")
        return self


# ---------------------------------------------------------------------------------------------------
# The job


class JobSpec(StrictModel):
    """One batch job: read shards -> decode images -> run the model with pruning -> write Parquet."""

    name: Optional[NonEmptyStr] = Field(None, description="Free-form job name recorded in the run summary.")
    input: InputSpec = Field(description="Input shards, columns and default prompt.")
    output: OutputSpec = Field(description="Output location and write mode.")
    model: ModelSpec = Field(description="Model weights and loading options.")
    pruning: PruningSpec = Field(
        default_factory=GlimpsePruning, description="Visual-token pruning strategy, chosen by `mode`."
    )
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Decoding settings.")
    chat: ChatSpec = Field(default_factory=ChatSpec, description="System prompt and chat template.")
    image: ImageSpec = Field(default_factory=ImageSpec, description="Image decode/resize limits.")
    batching: BatchingSpec = Field(default_factory=BatchingSpec, description="Batch token budgets.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Ray resources.")

    @model_validator(mode="after")
    def _cross_section_rules(self) -> "JobSpec":
        if self.output.uri.rstrip("/") == self.input.uri.rstrip("/"):
            raise FieldRuleError("output.uri", f"must differ from input.uri ({redact_url(self.input.uri)!r})")
        image_tokens = self.image.max_pixels // PIXELS_PER_TOKEN
        if self.batching.max_batch_tokens < image_tokens:
            raise FieldRuleError(
                "batching.max_batch_tokens",
                f"{self.batching.max_batch_tokens} cannot hold one image at image.max_pixels "
                f"{self.image.max_pixels} ({image_tokens} visual tokens)",
            )
        if self.batching.max_decode_tokens <= self.sampling.max_new_tokens:
            raise FieldRuleError(
                "batching.max_decode_tokens",
                f"{self.batching.max_decode_tokens} must exceed sampling.max_new_tokens {self.sampling.max_new_tokens}",
            )
        if self.input.columns.pruning and self.pruning.mode == "none":
            raise FieldRuleError("input.columns.pruning", "a per-row pruning column needs a pruning mode other than none")
        if self.model.device == "cuda" and self.resources.num_gpus_per_actor == 0:
            raise FieldRuleError("resources.num_gpus_per_actor", "must be > 0 when model.device is 'cuda'")
        if self.model.device == "cpu" and self.model.attn_implementation == "flash_attention_2":
            raise FieldRuleError("model.attn_implementation", "flash_attention_2 needs CUDA (model.device is 'cpu')")
        return self

    def redacted(self) -> "JobSpec":
        """A copy safe to write out: no userinfo/query strings in URLs, no secret-looking extras."""
        return self.model_copy(
            update={
                "input": self.input.model_copy(
                    update={"uri": redact_url(self.input.uri), "storage": self.input.storage.redacted()}
                ),
                "output": self.output.model_copy(
                    update={"uri": redact_url(self.output.uri), "storage": self.output.storage.redacted()}
                ),
                "model": self.model.model_copy(
                    update={"base": redact_url(self.model.base), "glimpse_modules": redact_url(self.model.glimpse_modules)}
                ),
                "resources": self.resources.model_copy(
                    update={"ray_address": redact_url(self.resources.ray_address)}
                ),
            }
        )

    def to_manifest(self) -> dict:
        """The resolved, redacted spec as plain JSON types (for `_summary.json`)."""
        return self.redacted().model_dump(mode="json")
