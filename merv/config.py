"""Typed configuration: model architecture and training stages as data.

A model is described by a *preset* (a YAML file in ``merv/presets/``) optionally patched by overrides from the
pipeline config. Everything is parsed into frozen dataclasses whose ``__post_init__`` checks cross-field rules and
raises ``ValueError`` with the offending key in the message, so a typo fails at DAG build time, not mid-training.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

EncoderKind = Literal["timm_image", "hf_image", "hf_video", "languagebind_video", "hiera_video"]
PoolingKind = Literal["avgpool3d", "avgpool2d", "conv3d", "attentive"]
PARAMETER_FREE_POOLING = ("avgpool3d", "avgpool2d")
HeadKind = Literal["linear", "mlp"]
FusionKind = Literal["cross_attention", "learnable_scalar", "channel_concat", "sequence_concat", "single"]
PromptFormat = Literal["vicuna", "llama2-chat", "base", "chat-template"]
Trainable = Literal["projectors", "fusion", "llm"]
ResizeMode = Literal["auto", "squash", "crop"]
Precision = Literal["fp32", "bf16", "fp16"]
StageText = Literal["conversation", "caption"]
MIN_TEXT_TOKENS = 64  # room for text the LLM context must keep besides the visual tokens (also >= 1/8 of it)


UNPINNED = "unpinned"  # a preset's explicit word that no commit of a source could be found to pin


def check_source(source: str | None, owner: str, schemes: tuple[str, ...], revision: str | None = None) -> None:
    """A weight ``source`` is ``<scheme>:<name>`` with a scheme in ``schemes`` (or absent: bring the weights); its
    ``revision`` is a full 40-hex commit sha, or ``unpinned`` (said explicitly), or absent."""
    scheme, _, name = (source or "").partition(":")
    if source is not None and (scheme not in schemes or not name):
        forms = " or ".join(f"{s}:<name>" for s in schemes)
        raise ValueError(f"{owner}: source must look like {forms}, got {source!r}")
    if revision is not None and revision != UNPINNED and not re.fullmatch(r"[0-9a-f]{40}", revision):
        raise ValueError(f"{owner}: revision must be a full 40-hex commit sha or {UNPINNED!r}, got {revision!r}")


@dataclass(frozen=True)
class EncoderConfig:
    """One frozen visual encoder with its own frame count and input size."""

    id: str
    kind: EncoderKind
    weights: str  # local folder (transformers) or file (timm); relative paths: see merv/weights.py
    num_frames: int
    image_size: int
    arch: str | None = None  # timm model name (required for timm_image); for hf_* the transformers model_type
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # timm create_model overrides (tiny models)
    # Which layer's tokens the projector sees: None = the model's final output (after its final norm, as
    # ``last_hidden_state`` / timm ``forward_features``); k = ``hidden_states[k]`` in transformers' numbering
    # (0: the embeddings, i: the output of block i, -2: the penultimate block's output, as MERV takes it).
    feature_layer: int | None = None
    # Frame preprocessing: "auto" = what the encoder's own processor does (timm pretrained config, transformers
    # preprocessor_config.json, CLIP's for LanguageBind), "squash" = resize the whole frame to image_size x image_size,
    # "crop" = resize the short side to image_size / crop_pct, then centre-crop image_size x image_size.
    resize: ResizeMode = "auto"
    crop_pct: float | None = None  # for "crop" (default: the encoder's own, else 1.0)
    mean: tuple[float, ...] | None = None  # normalisation (default: the encoder's own)
    std: tuple[float, ...] | None = None
    # Probability of mirroring a clip left-right (all its frames together). LanguageBind's own video transform, which
    # the original MERV uses, flips with 0.5 at training and at evaluation alike; merv draws the coin from the clip's
    # pixels, so a clip is flipped the same way in training, feature caches, evaluation and serving.
    hflip: float = 0.0
    cache: bool = True  # with train.features "cached": read this encoder's features from a cache (False: run it)
    source: str | None = None  # where `merv fetch-weights` gets the weights: "hf:<repo id>" or "timm:<model name>"
    revision: str | None = None  # the hub commit (40-hex sha) fetch-weights downloads, or "unpinned"

    def __post_init__(self):
        check_source(self.source, f"encoder {self.id!r}", ("hf", "timm"), self.revision)
        if not self.id.isidentifier():
            raise ValueError(f"encoder id {self.id!r} must be a Python identifier (it keys a ModuleDict)")
        if self.num_frames < 1:
            raise ValueError(f"encoder {self.id!r}: num_frames must be >= 1, got {self.num_frames}")
        if self.image_size < 8:
            raise ValueError(f"encoder {self.id!r}: image_size must be >= 8, got {self.image_size}")
        if self.kind == "timm_image" and not self.arch:
            raise ValueError(f"encoder {self.id!r}: kind 'timm_image' needs 'arch' (a timm model name)")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ValueError(f"encoder {self.id!r}: {name} needs 3 values (R, G, B), got {list(value)}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"encoder {self.id!r}: hflip is a probability in [0, 1], got {self.hflip}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"encoder {self.id!r}: crop_pct must be in (0, 1], got {self.crop_pct}")


@dataclass(frozen=True)
class ProjectorConfig:
    """Per-encoder projector: pool features to a fixed token grid, then map to the LLM width."""

    pooling: PoolingKind = "avgpool3d"
    temporal_tokens: int = 16  # T_out: temporal positions after pooling, the same for every encoder
    tokens_per_frame: int = 64  # spatial tokens per temporal position; must be a perfect square
    head: HeadKind = "linear"

    def __post_init__(self):
        side = math.isqrt(self.tokens_per_frame)
        if side * side != self.tokens_per_frame or side == 0:
            raise ValueError(f"projector.tokens_per_frame must be a perfect square, got {self.tokens_per_frame}")
        if self.temporal_tokens < 1:
            raise ValueError(f"projector.temporal_tokens must be >= 1, got {self.temporal_tokens}")

    @property
    def grid_side(self) -> int:
        return math.isqrt(self.tokens_per_frame)

    @property
    def visual_tokens(self) -> int:
        return self.temporal_tokens * self.tokens_per_frame

    @property
    def parameter_free(self) -> bool:
        """The pooling has no parameters (``avgpool3d``, ``avgpool2d``): its output depends on the frozen encoder
        alone, so a feature cache stores it pooled and training applies only the head."""
        return self.pooling in PARAMETER_FREE_POOLING


@dataclass(frozen=True)
class FusionConfig:
    # cross_attention also takes a single encoder (its weight is then always 1), as the original's single-encoder
    # models keep their fusion module; "single" is the parameter-free pass-through
    kind: FusionKind = "cross_attention"
    attn_dim: int | None = None  # cross_attention: width of the query/key space (default: the LLM width)


@dataclass(frozen=True)
class LLMConfig:
    weights: str  # local folder holding an AutoModelForCausalLM checkpoint and its tokenizer
    arch: str | None = None  # transformers model_type (llama, qwen2, ...): documents the family, builds stand-ins
    prompt_format: PromptFormat = "vicuna"
    max_length: int = 2048
    # "text" (the original): a sample's text alone is cut to max_length tokens, before its visual tokens are added
    # (a sequence holds up to max_length + visual tokens); "sequence": text and visual tokens together fit max_length
    truncation: Literal["text", "sequence"] = "text"
    source: str | None = None  # where `merv fetch-weights` gets the weights: "hf:<repo id>"
    # Tokens added to the tokenizer before use, and the multiple the embedding rows (and an untied LM head) are
    # resized to: the original adds {pad_token: "<PAD>"} to Llama tokenizers and pads to 64 (32000 -> 32064 rows)
    add_special_tokens: dict[str, str] = field(default_factory=dict)
    pad_vocab_to_multiple_of: int | None = None
    revision: str | None = None  # the hub commit (40-hex sha) fetch-weights downloads, or "unpinned"

    def __post_init__(self):
        check_source(self.source, "llm", ("hf",), self.revision)
        if self.max_length < 1:
            raise ValueError(f"llm.max_length must be >= 1, got {self.max_length}")
        if self.pad_vocab_to_multiple_of is not None and self.pad_vocab_to_multiple_of < 1:
            raise ValueError(f"llm.pad_vocab_to_multiple_of must be >= 1, got {self.pad_vocab_to_multiple_of}")
        for name, token in self.add_special_tokens.items():
            if not isinstance(token, str) or not token:
                raise ValueError(f"llm.add_special_tokens.{name}: expected a token string, got {token!r}")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    encoders: tuple[EncoderConfig, ...]
    llm: LLMConfig
    projector: ProjectorConfig = ProjectorConfig()
    fusion: FusionConfig = FusionConfig()
    # The dtype the weights are held in, whatever dtype the LLM folder is marked with (Llama-2's says float16); the
    # original holds and saves everything in float32, mixed precision only computes. In training, the groups a stage
    # trains are held in fp32 anyway (AdamW's master weights: updates of lr ~2e-5 relative size vanish in 16-bit
    # weights), so this only shrinks the frozen parts; the compute dtype is the stage's `mixed_precision`. Inference
    # (`--dtype`) may load in another.
    dtype: Precision = "fp32"

    def __post_init__(self):
        if not self.encoders:
            raise ValueError(f"model {self.name!r}: at least one encoder is required")
        ids = [e.id for e in self.encoders]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model {self.name!r}: encoder ids must be unique, got {ids}")
        one, kind = len(self.encoders) == 1, self.fusion.kind
        if (kind == "single" and not one) or (one and kind not in ("single", "cross_attention")):
            raise ValueError(
                f"model {self.name!r}: fusion 'single' goes with exactly one encoder, and one encoder goes with "
                f"fusion 'single' or 'cross_attention' (fusion {self.fusion.kind!r}, {len(self.encoders)} encoders)"
            )
        room = max(MIN_TEXT_TOKENS, self.llm.max_length // 8)
        if self.visual_tokens + room > self.llm.max_length:
            left = self.llm.max_length - self.visual_tokens
            raise ValueError(
                f"model {self.name!r}: {self.visual_tokens} visual tokens leave {left} of llm.max_length "
                f"{self.llm.max_length} for text; keep at least {room} (fewer temporal_tokens or tokens_per_frame, "
                "or a longer max_length)"
            )

    @property
    def visual_tokens(self) -> int:
        """Visual tokens the LLM sees: the projector grid, times the encoder count for sequence concatenation."""
        per_encoder = self.projector.visual_tokens
        return per_encoder * len(self.encoders) if self.fusion.kind == "sequence_concat" else per_encoder

    @property
    def frame_counts(self) -> dict[str, int]:
        return {e.id: e.num_frames for e in self.encoders}


@dataclass(frozen=True)
class StageConfig:
    """One training stage: which modules learn, on which data, with which optimiser settings."""

    name: str
    data: str  # name of a training split (a shard folder)
    trainable: tuple[Trainable, ...]
    epochs: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    global_batch_size: int = 32
    micro_batch_size: int = 8
    grad_clip: float = 1.0
    checkpoint_every: int = 0  # steps between resumable training states (0: only the final checkpoint)
    keep_last: int = 2  # resumable states kept
    shuffle_buffer: int = 1000  # samples in the loader's shuffle buffer (0: shard order)
    mixed_precision: Literal["no", "bf16"] = "no"
    activation_checkpointing: bool = False
    fsdp: Literal["full_shard", "shard_grad_op"] = "full_shard"  # used when training on several processes
    num_workers: int | None = None  # DataLoader processes per rank (None: compute.loader_workers); sets the order
    prefetch: int = 4  # batches each DataLoader worker prepares ahead
    # The loss projects only the positions that have a target through the LM head ("targets": no [B, S, vocab]
    # logits), or every position ("all": the reference path). kernels "liger" (GPU): Liger's RMSNorm/SwiGLU/RoPE
    # kernels and fused linear cross-entropy. compile: torch.compile each LLM block.
    loss_logits: Literal["targets", "all"] = "targets"
    kernels: Literal["plain", "liger"] = "plain"
    compile: bool = False
    # The text a sample trains on: "conversation" (the prompt format's turns, answers as targets) or "caption" (the
    # original's align stage: the answer of a one-question conversation alone, BOS + caption + EOS, all targets)
    text: StageText = "conversation"
    # Module groups taken from the previous stage's checkpoint (--init); None: every group it holds. The original's
    # finetune stage starts from the align stage's projectors only.
    init_groups: tuple[Trainable, ...] | None = None

    def __post_init__(self):
        if not self.trainable:
            raise ValueError(f"stage {self.name!r}: 'trainable' must name at least one module group")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"stage {self.name!r}: global_batch_size {self.global_batch_size} is not a multiple of "
                f"micro_batch_size {self.micro_batch_size}"
            )
        if self.epochs <= 0 or self.lr <= 0:
            raise ValueError(f"stage {self.name!r}: epochs and lr must be positive")
        if self.checkpoint_every < 0 or self.keep_last < 1:
            raise ValueError(f"stage {self.name!r}: checkpoint_every must be >= 0 and keep_last >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"stage {self.name!r}: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"stage {self.name!r}: num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 7
    stages: tuple[StageConfig, ...] = ()
    # "cached": the frozen encoders' outputs are computed once per shard folder (`merv features`, the
    # extract_features rule) and read by every stage and epoch; "on_the_fly": the encoders run in every step
    features: Literal["on_the_fly", "cached"] = "on_the_fly"
    feature_dtype: Precision = "bf16"  # how cached features are stored
    checkpoint_dtype: Precision = "fp32"  # how a stage's final checkpoint stores its weights (recorded in meta.json)

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")

    def cached_encoders(self, model: ModelConfig) -> list[str]:
        """Ids of the encoders whose features training reads from a cache."""
        return [e.id for e in model.encoders if e.cache] if self.features == "cached" else []

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ValueError(f"unknown stage {name!r}; this model has stages {[s.name for s in self.stages]}")


@dataclass(frozen=True)
class RunConfig:
    """A model plus its training recipe: what a preset file holds."""

    model: ModelConfig
    train: TrainConfig = TrainConfig()

    def __post_init__(self):
        bf16 = [s.name for s in self.train.stages if s.mixed_precision == "bf16"]
        if self.model.dtype == "fp16" and bf16:
            raise ValueError(
                f"model.dtype 'fp16' with mixed_precision 'bf16' in stage(s) {bf16}: weights held in fp16 would be "
                "computed in bf16; hold them in bf16 or fp32"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        return fingerprint(self.to_dict())


def with_loader_workers(run: RunConfig, workers: int) -> RunConfig:
    """``run`` with ``workers`` DataLoader workers in every stage that names none (``num_workers: null``)."""
    if workers < 0:
        raise ValueError(f"loader workers must be >= 0, got {workers}")
    stages = tuple(
        s if s.num_workers is not None else dataclasses.replace(s, num_workers=workers) for s in run.train.stages
    )
    return dataclasses.replace(run, train=dataclasses.replace(run.train, stages=stages))


# --------------------------------------------------------------------------------------------------------------
# Parsing: dict -> dataclass with type checks and clear errors


def parse_config(cls, data: Any, where: str):
    """``data`` (parsed YAML/JSON) as an instance of the dataclass ``cls``: every key known, every value of its field's
    type (nested dataclasses, tuples, mappings, ``Literal``, optional fields), missing keys taken from the defaults;
    a problem is a ``ValueError`` naming the key (``where.key[i]``)."""
    if dataclasses.is_dataclass(cls):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
        hints = get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
        kwargs = {k: parse_config(hints[k], v, f"{where}.{k}") for k, v in data.items()}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"{where}: missing required key(s) {missing}")
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    origin = get_origin(cls)
    if origin is Literal:
        if data not in get_args(cls):
            raise ValueError(f"{where}: {data!r} is not one of {list(get_args(cls))}")
        return data
    if origin is tuple:
        (item_type, _) = get_args(cls)
        if not isinstance(data, list | tuple):
            raise ValueError(f"{where}: expected a list, got {type(data).__name__}")
        return tuple(parse_config(item_type, v, f"{where}[{i}]") for i, v in enumerate(data))
    if origin is dict:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
        key_type, value_type = get_args(cls) or (str, Any)
        return {parse_config(key_type, k, where): parse_config(value_type, v, f"{where}.{k}") for k, v in data.items()}
    args = get_args(cls)
    if args and type(None) in args:  # Optional[X]
        if data is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return parse_config(inner, data, where)
    if cls is float:
        if isinstance(data, int | float) and not isinstance(data, bool):
            return float(data)
        raise ValueError(f"{where}: expected float, got {data!r}")
    if cls in (int, str, bool) and (not isinstance(data, cls) or (cls is int and isinstance(data, bool))):
        raise ValueError(f"{where}: expected {cls.__name__}, got {data!r}")
    return data


def read_json_spec(spec: str, where: str) -> tuple[Any, str]:
    """``(data, where)`` of a JSON value given inline (``spec`` starts with ``{``) or as the path of a JSON file
    (``where`` becomes the path): what a pipeline job is handed instead of a JSON blob on its command line."""
    text = spec
    if not spec.lstrip().startswith("{"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: {spec} is neither inline JSON nor a file")
        text, where = path.read_text(), str(path)
    try:
        return json.loads(text), where
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None


def deep_merge(base: dict, patch: dict) -> dict:
    """Recursively merge ``patch`` into a copy of ``base``: merv's one merge, of a preset with its ``base`` and its
    overrides, and of config files given in turn (as ``snakemake --configfile`` merges them: mappings recursively,
    everything else replaced). Lists are replaced, except that a mapping patching a list of mappings with an
    ``id``/``name`` key merges item by item (so an override can touch one encoder)."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), list):
            out[key] = _merge_keyed_list(out[key], value, key)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_keyed_list(items: list, patch: dict, where: str) -> list:
    by_key = {(it.get("id") or it.get("name")): i for i, it in enumerate(items)}
    out = copy.deepcopy(items)
    for key, value in patch.items():
        if key not in by_key:
            raise ValueError(f"override {where}.{key}: no item with that id; known: {sorted(by_key)}")
        out[by_key[key]] = deep_merge(out[by_key[key]], value)
    return out


def available_presets() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")] for p in resources.files("merv.presets").iterdir() if p.name.endswith(".yaml")
    )


def preset_dict(name: str, _seen: tuple[str, ...] = ()) -> dict:
    """The raw data of a preset; ``base: other`` makes it a patch of another preset."""
    path = resources.files("merv.presets") / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; available: {available_presets()}")
    if name in _seen:
        raise ValueError(f"preset {name!r} is its own base (chain: {' -> '.join(_seen + (name,))})")
    data = yaml.safe_load(path.read_text())
    base = data.pop("base", None)
    return deep_merge(preset_dict(base, _seen + (name,)), data) if base else data


def run_config_from_dict(data: dict, where: str = "config") -> RunConfig:
    return parse_config(RunConfig, data, where)


def resolve_run_config(preset: str, overrides: dict | None = None) -> RunConfig:
    """Build the typed config of a named preset, patched with ``overrides`` (same shape as the preset)."""
    data = preset_dict(preset)
    if overrides:
        data = deep_merge(data, overrides)
    return run_config_from_dict(data, where=f"preset {preset!r}")


def load_run_config(path: str | Path) -> RunConfig:
    return run_config_from_dict(json.loads(Path(path).read_text()), where=str(path))


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
