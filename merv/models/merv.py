"""The MERV model: several frozen encoders -> per-encoder projectors -> fusion -> spliced into an LLM after BOS."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from merv.config import ModelConfig
from merv.data.batching import pad_sequences
from merv.models.encoders import VisualEncoder, build_encoder
from merv.models.fusion import build_fusion
from merv.models.projector import build_projector
from merv.prompting import IGNORE_INDEX, PromptBuilder, check_option_letters, prompt_to_ids
from merv.weights import resolve_model


def attention_implementation() -> str:
    """flash-attn 2 when it is installed and a GPU is present (the optional ``gpu`` extra), else PyTorch SDPA."""
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def add_tokens(llm: nn.Module, tokenizer, tokens: dict[str, str], multiple: int | None) -> None:
    """Add special ``tokens`` to ``tokenizer`` and resize ``llm``'s embedding rows (and an untied LM head) to the
    tokenizer's length rounded up to ``multiple``, with transformers' own ``resize_token_embeddings``, as the
    original does; the pad token id goes into the LLM's config. Nothing changes when neither is asked for. (On the
    meta device the new rows are not drawn around the old rows' mean: there are no values to take it from.)"""
    if not tokens and multiple is None:
        return
    tokenizer.add_special_tokens(dict(tokens))
    on_meta = llm.get_input_embeddings().weight.device.type == "meta"
    llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=multiple, mean_resizing=not on_meta)
    if tokenizer.pad_token_id is not None:
        llm.config.pad_token_id = tokenizer.pad_token_id


def _dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` holds its weights in, which its inputs are cast to at each boundary (frozen encoders may be
    held in 16 bits beside fp32 projectors; under FSDP2's policy or autocast the compute casts on top of this)."""
    return next(module.parameters()).dtype


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
        self.encoders.eval()

    def train(self, mode: bool = True) -> MERV:
        """Train mode for the trainable parts; the frozen encoders stay in eval mode, so that their batch norms
        (a convolutional stem) neither update their running statistics nor normalise by the batch: an encoder
        computes what the feature cache stored and what its saved weights give."""
        super().train(mode)
        self.encoders.eval()
        return self

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, roots: list[Path] | tuple[Path, ...] = (), dtype: str | torch.dtype | None = None
    ) -> MERV:
        """Build from the weights the config names (``from_pretrained`` folders, timm files), found as
        :mod:`merv.weights` describes (``$MERV_WEIGHTS``, then ``roots``, then the working directory), held in
        ``dtype`` (default: the config's ``dtype``; never the dtype the LLM folder is marked with).

        The LLM gets the tokens the config adds (``llm.add_special_tokens``, its embedding rows resized to a multiple
        of ``llm.pad_vocab_to_multiple_of``), as the original does to Llama-2 (``<PAD>``, 32064 rows)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from merv.runtime import held_dtype

        torch_dtype = held_dtype(dtype if dtype is not None else cfg.dtype)
        cfg = resolve_model(cfg, roots)
        llm_path = Path(cfg.llm.weights)
        if not (llm_path / "config.json").is_file():
            raise FileNotFoundError(f"LLM weights: no transformers checkpoint (config.json) in {llm_path}")
        from merv.integrity import check_pretrained

        tokenizer = AutoTokenizer.from_pretrained(llm_path)
        llm, info = AutoModelForCausalLM.from_pretrained(
            llm_path, dtype=torch_dtype, attn_implementation=attention_implementation(), output_loading_info=True
        )
        check_pretrained(llm, info, llm_path, "LLM weights")  # every tensor consumed, none missing, all finite
        add_tokens(llm, tokenizer, cfg.llm.add_special_tokens, cfg.llm.pad_vocab_to_multiple_of)
        encoders = {e.id: build_encoder(e).to(torch_dtype) for e in cfg.encoders}
        model = cls(cfg, llm, tokenizer, encoders)
        model.projectors.to(torch_dtype)
        model.fusion.to(torch_dtype)
        return model

    loss_logits = "targets"  # "targets", "all" or "liger": how the loss gets its logits (see forward)

    def llm_blocks(self) -> list[nn.Module]:
        """The LLM's decoder blocks (transformers' ``model.layers`` layout)."""
        decoder = self.llm.get_decoder()
        return list(getattr(decoder, "layers", []))

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one: each (frozen) encoder, the input embeddings (called directly when
        splicing), the LLM's decoder blocks, each projector, a fusion with parameters. The whole model is the root
        unit, holding what is left (the LLM's final norm and head)."""
        fusion = [self.fusion] if any(True for _ in self.fusion.parameters()) else []
        units = [*self.encoders.values(), self.llm.get_input_embeddings(), *self.llm_blocks()]
        return [*units, *self.projectors.values(), *fusion]

    # ----------------------------------------------------------------------------------------------------------
    def encode(
        self, videos: dict[str, torch.Tensor] | None, features: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``{encoder: [B, T_e, 3, S_e, S_e]}`` (and, for cached encoders, their ``features``) -> fused visual tokens
        ``[B, L, D]`` and the fusion's per-encoder weights ``[B, E]`` (None for the concatenating fusions).

        A cached encoder's features are what :mod:`merv.features` stores: the pooled grid ``[B, L, C]`` for the
        parameter-free pooling projectors (only the head is left to apply), else the encoder output ``[B, T', N, C]``.
        """
        features = features or {}
        pooled = self.cfg.projector.parameter_free
        tokens = []
        for name, encoder in self.encoders.items():
            projector = self.projectors[name]
            if name in features:  # stored in the cache's dtype: cast to the projector's
                tokens.append(projector(features[name].to(_dtype(projector)), pooled=pooled))
                continue
            with torch.no_grad():  # encoders are frozen
                out = encoder(videos[name].to(_dtype(encoder)))  # [B, T', N, C]
            tokens.append(projector(out.to(_dtype(projector))))  # [B, L, D]
        return self.fusion(tokens)

    def blank_videos(self, batch: int = 1) -> dict[str, torch.Tensor]:
        """Zero inputs for every encoder (``{encoder: [batch, T_e, 3, S_e, S_e]}``)."""
        return {
            n: torch.zeros(batch, e.num_frames, 3, e.image_size, e.image_size, device=self.device, dtype=self.dtype)
            for n, e in self.encoders.items()
        }

    def splice(
        self,
        visual: torch.Tensor,
        has_video: torch.Tensor,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        labels: torch.Tensor | None = None,
        pad_left: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Insert each video row's visual tokens after BOS (first for BOS-less models) and pad to a batch.

        ``visual [Bv, V, D]`` belongs, in order, to the rows where ``has_video [B]`` is true (text-only rows get no
        visual tokens); ``input_ids``/``labels`` ``[B, L]`` are right-padded to ``lengths [B]``. Returns
        ``inputs_embeds [B, S, D]``, ``attention_mask [B, S]`` and ``labels [B, S]`` (visual and padding positions
        IGNORE_INDEX), padded on the left for generation.
        """
        dev = input_ids.device
        b, n = input_ids.shape
        v = visual.shape[1]
        cut = 1 if self.tokenizer.bos_token_id is not None else 0
        text = self.llm.get_input_embeddings()(input_ids)  # [B, L, D]: the whole batch in one call
        n_visual = has_video.to(dev).long() * v  # [B]
        total = lengths.to(dev) + n_visual
        width = int(total.max())
        offset = width - total if pad_left else torch.zeros_like(total)  # [B]
        t = torch.arange(n, device=dev)
        valid = t[None] < lengths.to(dev)[:, None]  # [B, L]
        pos = offset[:, None] + t[None] + torch.where(t[None] >= cut, n_visual[:, None], 0)  # [B, L]
        rows = torch.arange(b, device=dev)[:, None].expand(b, n)
        embeds = text.new_zeros(b, width, text.shape[-1])
        mask = torch.zeros(b, width, dtype=torch.long, device=dev)
        embeds[rows[valid], pos[valid]] = text[valid]
        mask[rows[valid], pos[valid]] = 1
        vrows = has_video.to(dev).nonzero().flatten()  # [Bv]
        vpos = offset[vrows, None] + cut + torch.arange(v, device=dev)[None]  # [Bv, V]
        vrows = vrows[:, None].expand(-1, v)
        embeds[vrows, vpos] = visual.to(text.dtype)
        mask[vrows, vpos] = 1
        if labels is None:
            return embeds, mask, None
        out_labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long, device=dev)
        out_labels[rows[valid], pos[valid]] = labels.to(dev)[valid]
        return embeds, mask, out_labels

    def forward(
        self,
        videos: dict[str, torch.Tensor] | None,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        lengths: torch.Tensor,
        has_video: torch.Tensor | None = None,
        features: dict[str, torch.Tensor] | None = None,
    ):
        """Training forward on a padded batch (``input_ids``/``labels`` ``[B, L]``, ``lengths [B]``); ``videos`` (and
        cached encoders' ``features``) hold the rows where ``has_video [B]`` is true (all rows when it is None).

        Returns ``(summed token loss, number of target tokens, fusion weights of the video rows)``.
        """
        if has_video is None:
            has_video = torch.ones(len(lengths), dtype=torch.bool)
        anchor = 0.0
        if bool(has_video.any()):
            visual, weights = self.encode(videos, features)  # [Bv, V, D], [Bv, E]
        else:
            # A text-only micro-batch still runs the visual path once, on blank frames, with weight 0 in the loss:
            # under FSDP every rank must gather (and reduce gradients of) every unit in every step.
            visual, _ = self.encode(self.blank_videos(1))
            anchor, visual, weights = visual.sum() * 0.0, visual[:0], None
        embeds, mask, targets = self.splice(visual, has_video, input_ids, lengths, labels)
        targets = targets[:, 1:]  # the token each position predicts
        return self.next_token_loss(embeds, mask, targets) + anchor, (targets != IGNORE_INDEX).sum(), weights

    def next_token_loss(self, embeds: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of ``targets [B, S-1]`` (IGNORE_INDEX: none) given ``inputs_embeds [B, S, D]``.

        ``loss_logits`` "targets" runs the LM head only on the positions with a target (a fraction of a sequence
        that is mostly visual and prompt tokens): the same numbers as "all", which computes every position's logits
        ``[B, S, vocab]`` as the LLM's own forward does; "liger" fuses the head and the loss (Liger, GPU)."""
        if self.loss_logits == "all":
            logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1]  # [B, S-1, vocab]
            return F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, :-1]
        picked = targets != IGNORE_INDEX
        hidden, wanted = hidden[picked], targets[picked]  # [T, D], [T]
        head = self.llm.get_output_embeddings()
        if self.loss_logits == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden, wanted, head.bias)
        return F.cross_entropy(head(hidden).float(), wanted, reduction="sum")

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
        (moved to the model's device and dtype here); ``videos=None`` answers text-only prompts."""
        ids = [prompt_to_ids(self.tokenizer, p) for p in prompts]
        input_ids, lengths = pad_sequences(ids, value=0)
        if videos is None:  # a text-only conversation
            has_video = torch.zeros(len(ids), dtype=torch.bool)
            dim = self.llm.get_input_embeddings().embedding_dim
            visual = torch.zeros(0, self.cfg.visual_tokens, dim, device=self.device, dtype=self.dtype)
        else:
            has_video = torch.ones(len(ids), dtype=torch.bool)
            visual, _ = self.encode({k: v.to(device=self.device, dtype=self.dtype) for k, v in videos.items()})
        embeds, mask, _ = self.splice(visual, has_video, input_ids.to(self.device), lengths, pad_left=True)
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
        from merv.data.transforms import frame_size
        from merv.data.video import read_frames

        counts = [e.num_frames for e in self.encoders.values()]
        if num_frames is not None and list(num_frames) != counts:
            raise ValueError(f"num_frames {list(num_frames)} does not match this model's encoders {counts}")
        frames, positions = read_frames(video, counts, frame_size(self.cfg.encoders))
        per_encoder = {name: frames[positions[enc.num_frames]] for name, enc in self.encoders.items()}
        videos = {k: v.unsqueeze(0) for k, v in self.transform(per_encoder).items()}
        return self.generate_batch(videos, [prompt], **gen_kwargs)[0]
