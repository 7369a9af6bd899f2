"""The pipeline configuration's sections (``config/config.yaml``) as typed records, and the one place of every default.

Each section of the config file is a frozen dataclass here, parsed with :func:`merv.config.parse_config` (unknown keys
and wrong types are errors naming the key). Its field defaults are the defaults everywhere: the commands' options
(``merv synth --train-videos``, ``merv eval --batch-size``, ...) take them from here, the records the stages run with
(:class:`merv.data.shards.ShardSettings`, :class:`EvalSettings`, :class:`merv.eval.judge.JudgeConfig`,
:class:`merv.train.launch.LaunchConfig`) take or extend them, and ``tests/test_settings.py`` checks that the JSON
schema (``workflow/schemas/config.schema.yaml``), which Snakemake fills missing keys from, says the same.

A field's ``help`` (:func:`setting`) is the help of its command-line option. The whole file is
:class:`merv.pipeline.PipelineConfig` (it also holds the pretrain entries, typed by their own module). This module
imports nothing of merv, so every stage may use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

Backend = Literal["decord", "pyav"]  # merv.data.video.BACKENDS
McqMode = Literal["generate", "likelihood", "both"]
FeatureDtype = Literal["bf16", "fp16", "fp32"]
CpuIsa = Literal["native", "avx2"]  # merv.runtime.ISA_ENV
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"  # merv.runtime.resolve_device (here: the CLI's help needs no torch)
DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]  # merv.runtime.resolve_dtype
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def setting(default: Any, help: str):  # noqa: A002 (argparse's word)
    """A field with its default and the help text its command-line option shows (:func:`merv.cli.add_setting`)."""
    return field(default=default, metadata={"help": help})


def parse_size(text: str) -> int:
    """``'200MB'``, ``'1GiB'``, ``'65536'`` -> bytes (MB = 10⁶ B, MiB = 2²⁰ B)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match[2].upper() not in SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 200MB, 1GiB, 65536)")
    return int(float(match[1]) * SIZE_UNITS[match[2].upper()])


@dataclass(frozen=True)
class PipelineSection:
    """``pipeline``: what ``snakemake`` (rule all) and ``dvc repro`` build when no target is given."""

    models: tuple[str, ...]  # names of configured models (keys of ``models``)

    def __post_init__(self):
        if not self.models:
            raise ValueError("pipeline.models must name at least one model")


@dataclass(frozen=True)
class SynthSection:
    """``synth``: the built-in synthetic dataset (``merv synth``), a pure function of these settings."""

    seed: int = setting(0, "random seed; the dataset is a pure function of these settings")
    train_videos: int = setting(1200, "training clips")
    eval_videos: int = setting(600, "questions (one clip each) per benchmark, every question type equally often")
    size: int = setting(64, "frame width and height in pixels (even: H.264)")
    frames: int = setting(16, "frames per clip")
    fps: int = setting(8, "frame rate of the written mp4 files")

    def __post_init__(self):
        if self.size % 2 or self.size < 32:
            raise ValueError(f"synth.size must be even and >= 32 (H.264 needs even sizes), got {self.size}")
        if self.frames < 4:
            raise ValueError(f"synth.frames must be >= 4, got {self.frames}")
        if min(self.train_videos, self.eval_videos, self.fps) < 1:
            raise ValueError("synth.train_videos, eval_videos and fps must be >= 1")


@dataclass(frozen=True)
class TrainSplit:
    """``data.train.<split>``: a Video-LLaVA style training JSON."""

    json: str
    root: str | None = None  # folder its media paths are relative to (None: the JSON's folder)


@dataclass(frozen=True)
class DataSection:
    """``data``: training splits by name (a stage's ``data`` names one) and benchmarks (MERV eval_data folders)."""

    train: dict[str, TrainSplit]
    benchmarks: dict[str, str]

    def __post_init__(self):
        if not self.train or not self.benchmarks:
            raise ValueError("data.train and data.benchmarks must each name at least one entry")


@dataclass(frozen=True)
class ShardSet:
    """``shards.sets.<name>``: frames stored at ``size`` px (short side), sampled for each count in ``frames``."""

    size: int
    frames: tuple[int, ...]

    def __post_init__(self):
        if self.size < 8 or not self.frames or min(self.frames) < 1 or len(set(self.frames)) != len(self.frames):
            raise ValueError(f"a shard set needs size >= 8 and distinct frame counts >= 1, got {self.size}, "
                             f"{list(self.frames)}")  # fmt: skip


def _small_shard_set() -> dict[str, ShardSet]:
    return {"small": ShardSet(size=64, frames=(4, 8))}


@dataclass(frozen=True)
class ShardsSection:
    """``shards``: WebDataset sharding (``merv shard``)."""

    target_size: str = setting("64MB", "target size of one tar, e.g. 64MB, 1GiB (MB = 10^6 bytes)")
    frame_format: Literal["jpg", "npy"] = setting("jpg", "how frames are stored: JPEG (quality 95) or lossless npy")
    # decord: faster than PyAV on sampled frames (benchmarks/ingest_long.py measures both)
    backend: Backend = setting("decord", "video decoder")
    workers: int = setting(2, "decoding processes of one sharding job")
    # off: the exact resize, whose pixels the decoder's scaler moves by more than resampling noise (docs/data.md)
    scale_in_decoder: bool = setting(
        False,
        "scale frames to the stored size inside the video decoder (FFmpeg's bicubic scaler: faster on large "
        "videos, other pixels) instead of resizing the decoded frames (bilinear, antialiased)",
    )
    strict: bool = setting(
        True, "fail on the first bad item, naming it (--no-strict: skip it and list it in <out>/quarantine.jsonl)"
    )
    items_per_part: int = setting(
        5000,
        "samples of a training split per sharding job (part): ranges of the JSON's order, gathered into one folder",
    )
    sets: dict[str, ShardSet] = field(default_factory=_small_shard_set)

    def __post_init__(self):
        if self.items_per_part < 1:
            raise ValueError(f"shards.items_per_part must be >= 1, got {self.items_per_part}")
        if self.workers < 1:
            raise ValueError(f"shards.workers must be >= 1, got {self.workers}")
        if self.target_bytes < 1:
            raise ValueError(f"shards.target_size must be positive, got {self.target_size!r}")
        if not self.sets:
            raise ValueError("shards.sets must name at least one shard set")
        for name in self.sets:
            if not re.fullmatch(r"[A-Za-z0-9_]+", name):
                raise ValueError(f"shards.sets: {name!r} is not a valid set name (letters, digits, _)")

    @property
    def target_bytes(self) -> int:
        return parse_size(self.target_size)


@dataclass(frozen=True)
class ModelEntry:
    """``models.<name>``: a preset patched by overrides, and where its weights come from."""

    preset: str
    # fetch: downloaded by `merv fetch-weights`; tiny: random weights of the configured (tiny) architectures;
    # standin: random toy weights of the preset's architecture families
    weights: Literal["fetch", "tiny", "standin"] = "fetch"
    overrides: dict[str, Any] = field(default_factory=dict)  # same shape as the preset
    pretrained_encoders: dict[str, str] = field(default_factory=dict)  # encoder id -> a `pretrain` entry


@dataclass(frozen=True)
class FusionWeightsFigure:
    """``report.fusion_weights``: a cross-attention model whose per-sample fusion weights are plotted."""

    model: str
    benchmark: str


@dataclass(frozen=True)
class ReportSection:
    """``report``: the tables and figures under results/tables (``merv report``)."""

    main: tuple[str, ...] = ()  # rows of the main table
    fusion_ablation: tuple[str, ...] = ()  # rows of the fusion ablation
    fusion_weights: FusionWeightsFigure | None = None
    # every reported model trains under each seed (results/<model>/seed-<s>/; seed s moves the preset's training
    # seed by s): the tables give mean and 95% CI over seeds and questions
    seeds: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class LaunchSection:
    """``launch``: how training stages run; not part of what a stage computes (changing it reruns nothing).
    :class:`merv.train.launch.LaunchConfig` adds what a submission needs besides."""

    launcher: Literal["none", "local", "slurm"] = setting(
        "none", "none: run in this process (or under torchrun); local: N processes; slurm: a Slurm job (submitit)"
    )
    nodes: int = setting(1, "nodes (slurm)")
    tasks_per_node: int = setting(1, "processes per node (one per GPU)")
    gpus_per_node: int = setting(0, "GPUs per node")
    partition: str | None = setting(None, "Slurm partition")
    account: str | None = setting(None, "Slurm account")
    time_min: int = setting(1440, "time limit of one job in minutes; a job that runs out requeues and resumes")

    def __post_init__(self):
        if self.nodes < 1 or self.tasks_per_node < 1 or self.gpus_per_node < 0 or self.time_min < 1:
            raise ValueError("launch: nodes, tasks_per_node and time_min must be >= 1, gpus_per_node >= 0")


@dataclass(frozen=True)
class JudgeSection:
    """``eval.judge``: the LLM judge of open-ended answers at an OpenAI-compatible endpoint (no url: exact match).
    :class:`merv.eval.judge.JudgeConfig` adds the settings only the command line and environment reach."""

    url: str | None = setting(None, "e.g. http://localhost:8000/v1 (vLLM, SGLang) or https://api.openai.com/v1")
    model: str | None = setting(None, "judge model (None: the one model the endpoint serves)")
    preset: Literal["video-chatgpt", "merv-original"] = setting(
        "video-chatgpt", "video-chatgpt (temperature 0, 64 tokens) or merv-original (max_tokens 500, no temperature)"
    )  # sampling settings: merv.eval.judge.PRESETS
    api_key_env: str = setting("MERV_JUDGE_API_KEY", "environment variable holding the API key (never written)")
    api_key_file: str | None = setting(None, "file holding the API key instead")
    concurrency: int = setting(8, "judge requests in flight")
    timeout_s: float = setting(60.0, "seconds per judge request")
    max_attempts: int = setting(5, "tries per request on timeouts, refused connections and HTTP 429/5xx")

    def __post_init__(self):
        for name in ("concurrency", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"judge {name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ValueError(f"judge timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class ComputeSection:
    """``compute``: how every computing job runs its numerics, what makes CPU float results bit-identical.

    ``threads`` is part of what a job computes (a float sum split over 2 threads is not the one over 1), so it comes
    from here, never from the cores a scheduler happens to give. ``isa``: ``native`` runs the fastest code path of
    this CPU (results are identical on CPUs of the same instruction set); ``avx2`` pins MKL, ATen and oneDNN to
    their AVX2 code paths, so AVX-512 and AVX2 machines compute the same bytes (see docs/reproducibility.md).
    ``loader_workers``: DataLoader processes of a training stage whose config names no ``num_workers``; the worker
    count is part of the sample order. One thread a job by default: Snakemake runs as many jobs side by side as it
    has cores, which uses them better than two threads a job and is far less hurt by other load (measured in
    docs/reproducibility.md)."""

    threads: int = setting(1, "CPU compute threads, whatever cores the job was given")
    isa: CpuIsa = setting("native", "CPU code path: this CPU's own, or AVX2 on every machine")
    loader_workers: int = setting(
        1, "DataLoader workers when the stage names no num_workers (part of the sample order)"
    )

    def __post_init__(self):
        if self.threads < 1:
            raise ValueError(f"compute.threads must be >= 1, got {self.threads}")
        if self.loader_workers < 0:
            raise ValueError(f"compute.loader_workers must be >= 0, got {self.loader_workers}")


@dataclass(frozen=True)
class EvalSection:
    """``eval``: evaluation (``merv eval``); changing it reruns only the evaluation jobs (answers come from the
    cache)."""

    batch_size: int = setting(32, "questions per generation batch")
    max_new_tokens: int | None = setting(None, "generation length limit (None: the benchmark's own, e.g. 512)")
    mcq: McqMode = setting("both", "multiple choice by generation (MERV's scoring), by option likelihood, or both")
    num_chunks: int = setting(1, "split the benchmark into N chunks (merged with an exactly-once check) ...")
    limit: int | None = setting(None, "only the first N questions of each benchmark, a quick look (None: all)")
    cache_dir: str = setting("results/eval_cache", "cache folder of answers and judge verdicts (content-addressed)")
    judge: JudgeSection = JudgeSection()

    def __post_init__(self):
        EvalSettings(self.mcq, self.batch_size, self.max_new_tokens, self.num_chunks, limit=self.limit)  # same checks


@dataclass(frozen=True)
class EvalSettings:
    """How one ``merv eval`` job evaluates a benchmark (what its numbers depend on, except the chunking); the
    defaults are the config's ``eval`` section's."""

    mcq: McqMode = EvalSection.mcq
    batch_size: int = EvalSection.batch_size
    max_new_tokens: int | None = EvalSection.max_new_tokens  # None: the benchmark's registry default
    num_chunks: int = EvalSection.num_chunks
    chunk_index: int = 0
    limit: int | None = EvalSection.limit  # only the first N questions of the benchmark (a quick look)

    def __post_init__(self):
        if self.mcq not in ("generate", "likelihood", "both"):
            raise ValueError(f"--mcq must be generate, likelihood or both, got {self.mcq!r}")
        if self.batch_size < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if self.num_chunks < 1 or not 0 <= self.chunk_index < self.num_chunks:
            raise ValueError(f"--chunk-index {self.chunk_index} must be in [0, --num-chunks {self.num_chunks})")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")


@dataclass(frozen=True)
class ExtractSettings:
    """How ``merv features`` runs one frozen encoder over a shard folder."""

    dtype: FeatureDtype = setting("bf16", "stored dtype")
    batch_size: int = setting(16, "samples per encoder forward")
    device: str | None = setting(None, "cpu, cuda or cuda:N (None: CUDA when present)")


# The config sections whose fields have defaults, by their key in config/config.yaml (command-line options name
# their config key through these; see merv.cli.add_setting).
SECTIONS: dict[str, type] = {
    "synth": SynthSection,
    "shards": ShardsSection,
    "report": ReportSection,
    "launch": LaunchSection,
    "compute": ComputeSection,
    "eval": EvalSection,
    "eval.judge": JudgeSection,
}
