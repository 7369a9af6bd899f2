import pytest
import torch

from merv.checkpoint import load_checkpoint, save_checkpoint
from merv.data.batching import collate, training_example
from merv.data.shards import iter_samples
from merv.prompting import IGNORE_INDEX, PromptBuilder, conversation_to_ids
from merv.train.loop import set_trainable


@pytest.fixture(scope="module")
def batch(tiny_model, shards):
    examples = [
        training_example(tiny_model, s) for s, _ in zip(iter_samples(shards["finetune"]), range(3), strict=False)
    ]
    return collate(examples)


def test_encoders_declare_their_contract(tiny_model):
    vit, vivit = tiny_model.encoders["vit"], tiny_model.encoders["vivit"]
    assert (vit.num_frames, vit.temporal_positions, vit.tokens_per_frame, vit.embed_dim) == (4, 4, 16, 64)
    assert (vivit.num_frames, vivit.temporal_positions, vivit.tokens_per_frame) == (8, 4, 16)
    for enc in (vit, vivit):
        frames = torch.randint(0, 255, (enc.num_frames, 64, 64, 3), dtype=torch.uint8)
        video = enc.transform(frames.numpy())
        assert video.shape == (enc.num_frames, 3, enc.image_size, enc.image_size)
        out = enc(video.unsqueeze(0))
        assert out.shape == (1, enc.temporal_positions, enc.tokens_per_frame, enc.embed_dim)


def test_letters_are_single_tokens(tiny_model):
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        assert len(tiny_model.tokenizer(" " + letter, add_special_tokens=False)["input_ids"]) == 1


def test_labels_only_on_answers(tiny_model):
    conv = [
        {"from": "human", "value": "<video>\nWhat colour is the moving shape?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Which shape is in the video?"},
        {"from": "gpt", "value": "circle"},
    ]
    ids, labels = conversation_to_ids(tiny_model.tokenizer, conv, "base")
    tok = tiny_model.tokenizer
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    answer_text = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    assert answer_text.replace(tok.eos_token, "|") == " red| circle|"
    assert "<video>" not in tok.decode(ids)


def test_prompt_builder_alternates_roles():
    builder = PromptBuilder("base")
    builder.add_turn("human", "hi")
    with pytest.raises(ValueError, match="alternate"):
        builder.add_turn("human", "again")


def test_visual_tokens_follow_bos(tiny_model, batch):
    v = tiny_model.cfg.visual_tokens
    visual, weights = tiny_model.encode(batch["videos"])
    assert visual.shape == (3, v, 128) and torch.allclose(weights.sum(-1), torch.ones(3))
    ids, lengths, rows = batch["input_ids"], batch["lengths"], batch["has_video"]
    embeds, mask, labels = tiny_model.splice(visual, rows, ids, lengths)
    bos = tiny_model.llm.get_input_embeddings()(torch.tensor([tiny_model.tokenizer.bos_token_id]))
    assert torch.allclose(embeds[0, 0], bos[0])
    assert torch.allclose(embeds[0, 1 : v + 1], visual[0])
    assert labels is None
    assert mask.sum(1).tolist() == [n + v for n in lengths.tolist()]
    _, _, labels = tiny_model.splice(visual, rows, ids, lengths, batch["labels"])
    assert (labels[:, 1 : v + 1] == IGNORE_INDEX).all()
    n0 = int(lengths[0])
    assert torch.equal(labels[0, v + 1 : v + n0], batch["labels"][0, 1:n0])


def test_text_only_rows_get_no_visual_tokens(tiny_model, batch):
    """A batch mixing video and text-only rows: each text-only row is its text alone, padded; left padding for
    generation puts every row's last token at the end."""
    v, emb = tiny_model.cfg.visual_tokens, tiny_model.llm.get_input_embeddings()
    visual, _ = tiny_model.encode({n: x[[0, 2]] for n, x in batch["videos"].items()})  # rows 0 and 2 have a video
    rows = torch.tensor([True, False, True])
    ids, lengths = batch["input_ids"], batch["lengths"]
    embeds, mask, labels = tiny_model.splice(visual, rows, ids, lengths, batch["labels"])
    n1 = int(lengths[1])
    assert mask[1].sum() == n1 and torch.allclose(embeds[1, :n1], emb(ids[1, :n1]))
    assert torch.equal(labels[1, :n1], batch["labels"][1, :n1]) and (labels[1, n1:] == IGNORE_INDEX).all()
    assert torch.allclose(embeds[2, 1 : v + 1], visual[1]), "the second video row gets the second visual block"
    left, mask_left, _ = tiny_model.splice(visual, rows, ids, lengths, pad_left=True)
    for i, n in enumerate((lengths + rows.long() * v).tolist()):
        assert mask_left[i, -n:].all() and not mask_left[i, :-n].any()
        assert torch.allclose(left[i, -1], emb(ids[i, lengths[i] - 1]))


def test_a_text_only_micro_batch_still_runs_the_visual_path(tiny_model, batch):
    """Under FSDP every rank must use every unit in every step: a micro-batch without videos runs the projectors and
    fusion on blank frames with weight 0, so they get (zero) gradients instead of none."""
    set_trainable(tiny_model, ("projectors", "fusion", "llm"))
    tiny_model.zero_grad(set_to_none=True)
    rows = torch.zeros(3, dtype=torch.bool)
    loss, n, weights = tiny_model(None, batch["input_ids"], batch["labels"], batch["lengths"], rows)
    (loss / n).backward()
    assert weights is None and torch.isfinite(loss)
    for name, p in tiny_model.named_parameters():
        if name.startswith(("projectors", "fusion")):
            assert p.grad is not None and p.grad.abs().sum() == 0, name
    assert tiny_model.llm.get_input_embeddings().weight.grad.abs().sum() > 0
    tiny_model.zero_grad(set_to_none=True)
    tiny_model.requires_grad_(False)
    tiny_model.eval()


def test_gradients_reach_exactly_the_trainable_groups(tiny_model, batch):
    set_trainable(tiny_model, ("projectors", "fusion"))
    tiny_model.zero_grad(set_to_none=True)
    loss, n, _ = tiny_model(batch["videos"], batch["input_ids"], batch["labels"], batch["lengths"])
    (loss / n).backward()
    for name, p in tiny_model.named_parameters():
        group = name.split(".")[0]
        if name == "fusion.key.bias":  # adds q . b_k to every encoder's score: the softmax cancels it exactly
            assert p.grad is not None and float(p.grad.abs().max()) < 1e-6, name
        elif group in ("projectors", "fusion"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    tiny_model.zero_grad(set_to_none=True)
    tiny_model.eval()


def test_save_load_gives_identical_logits(tiny_model, tiny_run, batch, tmp_path):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tiny_model.projectors.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tiny_model.eval()
    save_checkpoint(tiny_model, tiny_run, tmp_path / "ckpt", {"trained_groups": ["projectors", "fusion"]})
    loaded, run, meta = load_checkpoint(tmp_path / "ckpt")
    loaded.eval()
    assert run == tiny_run and meta["trained_groups"] == ["projectors", "fusion"]
    with torch.no_grad():
        a = tiny_model(batch["videos"], batch["input_ids"], batch["labels"], batch["lengths"])[0]
        b = loaded(batch["videos"], batch["input_ids"], batch["labels"], batch["lengths"])[0]
    assert torch.equal(a, b)


def test_greedy_generation_same_with_and_without_kv_cache(tiny_model, batch):
    tiny_model.eval()
    prompts = ["In: What colour is the moving shape?\nOut:", "In: Which way?\nOut:", "In: Hi\nOut:"]
    with_cache = tiny_model.generate_batch(batch["videos"], prompts, max_new_tokens=6, use_cache=True)
    without = tiny_model.generate_batch(batch["videos"], prompts, max_new_tokens=6, use_cache=False)
    assert with_cache == without


def test_generate_from_video_file(tiny_model, synth_dir):
    video = synth_dir / "eval_data" / "synth_open" / "videos" / "eval_00000.mp4"
    builder = tiny_model.get_prompt_builder()
    builder.add_turn("human", "What colour is the moving shape?")
    out = tiny_model.generate(video, builder.get_prompt(), num_frames=[4, 8], max_new_tokens=4)
    assert isinstance(out, str)
    with pytest.raises(ValueError, match="does not match"):
        tiny_model.generate(video, builder.get_prompt(), num_frames=[16, 16])


@pytest.mark.parametrize("held", ["fp32", "bf16", "fp16"])
def test_every_boundary_agrees_in_every_precision_mode(tiny_run, batch, held):
    """Weights held in ``held`` (``model.dtype`` / inference ``--dtype``), fed fp32 frames or cached features stored
    in any dtype; then the training mode: trained groups in fp32 beside the frozen encoders in ``held``, plain and
    under bf16 autocast. Every boundary (frames -> encoder -> projector, features -> projector, fusion -> LLM) casts
    to the weights it meets: finite losses, fp32 gradients."""
    from merv.models.merv import MERV
    from merv.runtime import held_dtype

    dtype = held_dtype(held)
    model = MERV.from_config(tiny_run.model, dtype=held).eval()
    assert {p.dtype for p in model.parameters()} == {dtype}
    args = (batch["input_ids"], batch["labels"], batch["lengths"], batch["has_video"])
    with torch.no_grad():
        losses = [model(batch["videos"], *args)[0]]
        pooled = {n: model.projectors[n].pool(model.encoders[n](v.to(dtype))) for n, v in batch["videos"].items()}
        for stored in (torch.float32, torch.bfloat16, torch.float16):
            features = {n: f.to(stored) for n, f in pooled.items()}
            losses.append(model(None, *args, features=features)[0])
    assert all(torch.isfinite(loss) for loss in losses), losses
    set_trainable(model, ("projectors", "fusion", "llm"))
    assert {p.dtype for p in model.encoders.parameters()} == {dtype}
    for autocast in (False, True) if held != "fp16" else (False,):  # fp16 weights never go with bf16 compute
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss, n, _ = model(batch["videos"], *args, features={"vit": pooled["vit"].to(torch.bfloat16)})
        (loss / n).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert torch.isfinite(loss) and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        model.zero_grad(set_to_none=True)
