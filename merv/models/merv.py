"""The MERV model: several frozen encoders -> per-encoder projectors -> fusion -> spliced into an LLM after BOS."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from merv.config import ModelConfig
from merv.models.encoders import VisualEncoder, build_encoder
from merv.models.fusion import build_fusion
from merv.models.projector import build_projector
from merv.models.prompting import IGNORE_INDEX, PromptBuilder, check_option_letters, prompt_to_ids


def attention_implementation() -> str:
    """flash-attn 2 when it is installed and a GPU is present (the optional ``gpu`` extra), else PyTorch SDPA."""
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class MERV(nn.Module):
    """encode (frozen encoders) -> project (per encoder) -> fuse -> splice after BOS -> LLM."""

    def __init__(self, cfg: ModelConfig, llm: nn.Module, tokenizer, encoders: dict[str, VisualEncoder]):
        super().__init__()
        check_option_letters(tokenizer, cfg.llm.prompt_format)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.encoders = nn.ModuleDict(encoders)
        self.llm = llm
        dim = llm.get_input_embeddings().embedding_dim
        self.projectors = nn.ModuleDict(
            {name: build_projector(cfg.projector, enc.embed_dim, dim) for name, enc in encoders.items()}
        )
        self.fusion = build_fusion(cfg.fusion, dim, len(encoders))

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> MERV:
        """Build from the weights the config points to (local folders, ``from_pretrained`` / timm file path)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        llm_path = Path(cfg.llm.weights)
        if not (llm_path / "config.json").is_file():
            raise FileNotFoundError(f"LLM weights: no transformers checkpoint (config.json) in {llm_path}")
        tokenizer = AutoTokenizer.from_pretrained(llm_path)
        llm = AutoModelForCausalLM.from_pretrained(llm_path, attn_implementation=attention_implementation())
        encoders = {e.id: build_encoder(e) for e in cfg.encoders}
        return cls(cfg, llm, tokenizer, encoders)

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one: each (frozen) encoder, the input embeddings (called directly when
        splicing), the LLM's decoder blocks, each projector, a fusion with parameters. The whole model is the root
        unit, holding what is left (the LLM's final norm and head)."""
        blocks = list(self.llm.model.layers) if hasattr(self.llm, "model") and hasattr(self.llm.model, "layers") else []
        fusion = [self.fusion] if any(True for _ in self.fusion.parameters()) else []
        return [*self.encoders.values(), self.llm.get_input_embeddings(), *blocks, *self.projectors.values(), *fusion]

    # ----------------------------------------------------------------------------------------------------------
    def encode(self, videos: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``{encoder: [B, T_e, 3, S_e, S_e]}`` -> fused visual tokens ``[B, L, D]`` and the fusion's per-encoder
        weights ``[B, E]`` (None for the concatenating fusions)."""
        tokens = []
        for name, encoder in self.encoders.items():
            with torch.no_grad():  # encoders are frozen
                features = encoder(videos[name])  # [B, T', N, C]
            tokens.append(self.projectors[name](features))  # [B, L, D]
        return self.fusion(tokens)

    def splice(
        self,
        visual: torch.Tensor,
        input_ids: list[torch.Tensor | list[int]],
        labels: list[torch.Tensor | list[int]] | None,
        pad_left: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Insert visual tokens after BOS (first for BOS-less models) and pad to a batch.

        Takes unpadded token id sequences; returns ``inputs_embeds [B, S, D]``, ``attention_mask [B, S]`` and
        ``labels [B, S]`` (visual and padding positions are IGNORE_INDEX).
        """
        embed = self.llm.get_input_embeddings()
        cut = 1 if self.tokenizer.bos_token_id is not None else 0
        b, v, dim = visual.shape
        ids = [torch.as_tensor(x, dtype=torch.long, device=visual.device) for x in input_ids]
        length = max(len(x) for x in ids) + v
        embeds = visual.new_zeros(b, length, dim)
        mask = torch.zeros(b, length, dtype=torch.long, device=visual.device)
        out_labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long, device=visual.device)
        for i, x in enumerate(ids):
            n = len(x) + v
            span = slice(length - n, length) if pad_left else slice(0, n)
            text = embed(x)  # [S_i, D]
            embeds[i, span] = torch.cat([text[:cut], visual[i], text[cut:]])
            mask[i, span] = 1
            if labels is not None:
                lab = torch.as_tensor(labels[i], dtype=torch.long, device=visual.device)
                out_labels[i, span] = torch.cat([lab[:cut], out_labels.new_full((v,), IGNORE_INDEX), lab[cut:]])
        return embeds, mask, (out_labels if labels is not None else None)

    def forward(self, videos: dict[str, torch.Tensor], input_ids: torch.Tensor, labels: torch.Tensor, lengths):
        """Training forward on a padded batch (``input_ids``/``labels`` ``[B, L]``, ``lengths [B]``).

        Returns ``(summed token loss, number of target tokens, fusion weights)``.
        """
        visual, weights = self.encode(videos)  # [B, V, D], [B, E]
        unpadded = [(input_ids[i, :n], labels[i, :n]) for i, n in enumerate(lengths.tolist())]
        embeds, mask, targets = self.splice(visual, [x for x, _ in unpadded], [y for _, y in unpadded], pad_left=False)
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits  # [B, S, vocab]
        shift_logits, shift_targets = logits[:, :-1], targets[:, 1:]
        loss_sum = F.cross_entropy(
            shift_logits.flatten(0, 1).float(), shift_targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss_sum, (shift_targets != IGNORE_INDEX).sum(), weights

    # ----------------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def place(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> MERV:
        """Move to ``device`` in ``dtype`` for inference (default: CUDA in bf16 when present, else CPU fp32)."""
        from merv.runtime import resolve_device, resolve_dtype

        dev = resolve_device(device)
        return self.to(device=dev, dtype=resolve_dtype(dtype, dev))

    def get_prompt_builder(self) -> PromptBuilder:
        return PromptBuilder(self.cfg.llm.prompt_format, self.tokenizer)

    def transform(self, frames_by_encoder: dict[str, object]) -> dict[str, torch.Tensor]:
        """uint8 frames per encoder -> normalised tensors ``{encoder: [T, 3, S, S]}``."""
        return {name: enc.transform(frames_by_encoder[name]) for name, enc in self.encoders.items()}

    @torch.no_grad()
    def generate_batch(
        self, videos: dict[str, torch.Tensor], prompts: list[str], max_new_tokens: int = 32, **gen_kwargs
    ) -> list[str]:
        """Batched generation (left padded, KV cache) for already-transformed videos ``{enc: [B, T, 3, S, S]}``
        (moved to the model's device and dtype here)."""
        videos = {k: v.to(device=self.device, dtype=self.dtype) for k, v in videos.items()}
        visual, _ = self.encode(videos)
        ids = [prompt_to_ids(self.tokenizer, p) for p in prompts]
        embeds, mask, _ = self.splice(visual, ids, None, pad_left=True)
        gen_kwargs.setdefault("do_sample", False)
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **gen_kwargs,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def generate(self, video, prompt: str, num_frames: list[int] | None = None, **gen_kwargs) -> str:
        """The original API: ``generate(video_path_or_frames, prompt_text, num_frames=[...], ...)``."""
        from merv.data.video import read_frames

        counts = [e.num_frames for e in self.encoders.values()]
        if num_frames is not None and list(num_frames) != counts:
            raise ValueError(f"num_frames {list(num_frames)} does not match this model's encoders {counts}")
        size = max(e.image_size for e in self.encoders.values())
        frames, positions = read_frames(video, counts, size)
        per_encoder = {name: frames[positions[enc.num_frames]] for name, enc in self.encoders.items()}
        videos = {k: v.unsqueeze(0) for k, v in self.transform(per_encoder).items()}
        return self.generate_batch(videos, [prompt], **gen_kwargs)[0]
