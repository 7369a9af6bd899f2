"""merv import-original: a checkpoint in the original MERV's layout (tests/data/original_layout.json) imports exactly.

The "original" is synthesised at reduced width but with the real key set (four encoders' projectors, the one-head
cross-attention fusion with its unused value/output projections, a Llama LLM) and the real vocabulary arithmetic: a
32000-piece SentencePiece tokenizer, a <PAD> token, rows padded to 64 (32064), in an LLM folder marked float16.
"""

import hashlib
import json
import math
import pathlib

import pytest
import torch

from merv.checkpoint import WEIGHTS, load_checkpoint
from merv.cli import main
from merv.config import resolve_run_config, run_config_from_dict
from merv.convert import ConversionError, file_sha256, import_original
from merv.integrity import IntegrityError
from merv.models.standins import build_standin_weights
from merv.prompting import prompt_to_ids
from tests.original import (
    OriginalFusion,
    layout,
    manifest_shapes,
    original_llm,
    original_projectors,
    original_state,
    reference_logits,
    save_original,
)

A = 24  # the fusion query width (3072 in the paper's models)
D = 64  # the LLM width (4096)


class Evil:
    """Unpickling this would create a file: the payload a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def llm_folder(spm_model, out: pathlib.Path) -> pathlib.Path:
    """A Llama-2-shaped LLM at width 64 (no grouped-query attention) with the real 32000-piece tokenizer, saved
    in float16 as Llama-2-7b-hf is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.spm import build_tokenizer

    tokenizer = build_tokenizer(spm_model, "legacy", out)
    assert len(tokenizer) == 32000 and tokenizer.pad_token is None
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    return out


def reduced(preset: str, weights: pathlib.Path, llm: pathlib.Path, **fusion):
    """``preset`` with stand-in encoders of its families, the test LLM and a fusion query of width A."""
    run = build_standin_weights(resolve_run_config(preset), weights)
    data = run.to_dict()
    data["model"]["llm"]["weights"] = str(llm)
    data["model"]["fusion"] = {"kind": "cross_attention", "attn_dim": A, **fusion}
    return run_config_from_dict(data)


@pytest.fixture(scope="module")
def frozen(spm_model, tmp_path_factory):
    """merv-frozen at reduced width, its original-layout checkpoint and the import of it (through the CLI)."""
    from merv.models.merv import MERV

    root = tmp_path_factory.mktemp("frozen")
    run = reduced("merv-frozen", root / "standins", llm_folder(spm_model, root / "llm"))
    (root / "run.json").write_text(json.dumps(run.to_dict()))
    widths = [enc.embed_dim for enc in MERV.from_config(run.model).encoders.values()]
    torch.manual_seed(5)
    projectors = original_projectors(widths, D)
    fusion = OriginalFusion(A, D)
    with torch.no_grad():  # the original's fusion biases start at zero: trained ones do not
        fusion.attention.in_proj_bias.normal_(0, 0.3)
    backbone, tokenizer = original_llm(root / "llm")
    state = original_state(projectors, backbone, fusion)
    path = save_original(root / "latest-checkpoint.pt", state)
    rc = main(["import-original", str(path), "--config", str(root / "run.json"), "--out", str(root / "imported")])
    assert rc == 0
    return {"root": root, "run": run, "state": state, "path": path, "widths": widths, "tokenizer": tokenizer}


def test_the_synthesised_checkpoint_has_the_manifests_layout(frozen):
    """Modules composed as the original's save exactly the keys and shapes the manifest lists (at reduced width),
    and the vocabulary arithmetic is the original's: 32000 pieces + <PAD> -> 32064 rows."""
    manifest = layout()
    vocab = manifest["vocabulary"]
    rows = math.ceil((vocab["tokenizer_pieces"] + 1) / vocab["pad_to_multiple_of"]) * vocab["pad_to_multiple_of"]
    assert rows == vocab["embedding_rows"] == manifest["symbols"]["V"] == 32064
    assert frozen["tokenizer"].pad_token_id == vocab["pad_token_id"] == 32000
    symbols = {"V": rows, "D": D, "I": 96, "KV": D, "A": A, "L": 2, "C": frozen["widths"]}
    groups = manifest["models"]["merv-frozen"]["saved_groups"]["finetune"]
    expected = manifest_shapes(symbols, groups)
    for group in groups:
        assert {k: tuple(v.shape) for k, v in frozen["state"][group].items()} == expected[group], group
    saved = torch.load(frozen["path"], weights_only=True)
    assert sorted(saved) == sorted(manifest["top_level"])


def test_import_keeps_the_rows_the_pad_token_and_float32(frozen):
    model, run, meta = load_checkpoint(frozen["root"] / "imported")
    assert meta["trained_groups"] == ["fusion", "llm", "projectors"]
    assert meta["source"]["sha256"] == hashlib.sha256(frozen["path"].read_bytes()).hexdigest()
    assert run.model.llm.add_special_tokens == {"pad_token": "<PAD>"} and run.model.llm.pad_vocab_to_multiple_of == 64
    assert model.llm.get_input_embeddings().weight.shape == (32064, D) == model.llm.get_output_embeddings().weight.shape
    assert model.tokenizer.convert_tokens_to_ids("<PAD>") == 32000 == model.tokenizer.pad_token_id
    # the LLM folder is marked float16: the import holds the original's float32 weights as float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    llm, projectors = frozen["state"]["llm_backbone"], frozen["state"]["projectors"]
    assert torch.equal(model.llm.get_input_embeddings().weight, llm["llm.model.embed_tokens.weight"])
    assert torch.equal(model.projectors["vivit"].head.weight, projectors["2.projector.projector.weight"])


def test_imported_logits_are_the_originals_arithmetic(frozen):
    """merv's forward on the imported model equals the original's equations on the checkpoint's tensors."""
    from transformers import LlamaForCausalLM

    model, run, _ = load_checkpoint(frozen["root"] / "imported")
    model.eval()
    state = frozen["state"]
    reference = LlamaForCausalLM(model.llm.config).eval()  # the original's LLM: the checkpoint's llm.* weights
    reference.load_state_dict({k.removeprefix("llm."): v for k, v in state["llm_backbone"].items()})
    torch.manual_seed(2)
    videos = {n: torch.randn(2, e.num_frames, 3, e.image_size, e.image_size) for n, e in model.encoders.items()}
    ids = [prompt_to_ids(model.tokenizer, "In: What happens?\nOut: A ball <PAD> rolls")] * 2
    input_ids = torch.tensor(ids)
    assert input_ids[0, 0] == model.tokenizer.bos_token_id and 32000 in ids[0]
    with torch.no_grad():
        features = [model.encoders[n](videos[n]) for n in model.encoders]  # [B, T', N, C] each
        want = reference_logits(features, input_ids, state, reference, 16, 8)
        visual, weights = model.encode(videos)
        lengths = torch.tensor([len(i) for i in ids])
        embeds, mask, _ = model.splice(visual, torch.ones(2, dtype=torch.bool), input_ids, lengths)
        got = model.llm(inputs_embeds=embeds, attention_mask=mask).logits
        labels = input_ids.clone()
        loss, n_targets, _ = model(videos, input_ids, labels, lengths)
    assert got.shape == want.shape == (2, 1024 + len(ids[0]), 32064)
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= 1e-5, rel
    assert not torch.allclose(weights, torch.full_like(weights, 0.25), atol=1e-3), "the fusion weights are trained"
    # the training loss is the cross-entropy of the same logits (the text tokens after BOS are the targets)
    text = want[:, 1024:-1]  # positions predicting tokens 1.. of the text
    ref_loss = torch.nn.functional.cross_entropy(text.flatten(0, 1), input_ids[:, 1:].flatten(), reduction="sum")
    assert int(n_targets) == 2 * (len(ids[0]) - 1) and float(loss) == pytest.approx(float(ref_loss), rel=1e-5)


def test_merv_eval_runs_on_the_import(frozen, synth_dir, tmp_path):
    from merv.data.shards import ShardSettings, collect_items, write_shards

    bench = tmp_path / "synth_mcq"
    write_shards(collect_items(synth_dir / "eval_data" / "synth_mcq"), bench, ShardSettings((16, 32), 64))
    out = tmp_path / "result.json"
    rc = main(["eval", "--model", str(frozen["root"] / "imported"), "--data", str(bench), "--out", str(out),
               "--no-cache", "--batch-size", "6", "--device", "cpu"])  # fmt: skip
    result = json.loads(out.read_text())
    assert rc == 0 and result["summary"]["n"] == 6 and result["summary"]["metric"] == "accuracy_generate_firstchar"


def test_legacy_projector_and_adapter_names_and_one_encoder_cross_attention(spm_model, tmp_path):
    """An older single-encoder checkpoint: one 'projector' group (read as projector 0) and the fusion under
    'adapter', a cross-attention over its one encoder (weight 1), as the original's single-encoder models keep."""
    run = reduced("siglip-single", tmp_path / "standins", llm_folder(spm_model, tmp_path / "llm"))
    assert run.model.fusion.kind == "cross_attention" and len(run.model.encoders) == 1
    torch.manual_seed(1)
    projectors = original_projectors([32], D)
    backbone, _ = original_llm(tmp_path / "llm")
    state = original_state(projectors, backbone, OriginalFusion(A, D))
    state["projector"] = {k.removeprefix("0."): v for k, v in state.pop("projectors").items()}
    state["adapter"] = state.pop("feature_fusion")
    import_original(save_original(tmp_path / "old.pt", state), run, tmp_path / "imported")
    model, _, _ = load_checkpoint(tmp_path / "imported")
    assert torch.equal(model.projectors["siglip"].head.weight, state["projector"]["projector.projector.weight"])
    assert torch.equal(model.fusion.query, state["adapter"]["Q"])
    with torch.no_grad():
        _, weights = model.encode({"siglip": torch.randn(2, 16, 3, 224, 224)})
    assert torch.equal(weights, torch.ones(2, 1))


@pytest.mark.parametrize("kind", ["channel_concat", "learnable_scalar"])
def test_the_originals_other_fusions_import(frozen, tmp_path, kind):
    """concat_channel (a LinearProjector over the encoders' channels) and the ScalarAdapter (four logits)."""
    data = frozen["run"].to_dict()
    data["model"]["fusion"] = {"kind": kind, "attn_dim": None}
    run = run_config_from_dict(data)
    torch.manual_seed(3)
    if kind == "channel_concat":
        fusion = {"projector.weight": torch.randn(D, 4 * D), "projector.bias": torch.randn(D)}
    else:
        fusion = {"scalar": torch.randn(4)}
    state = {**frozen["state"], "feature_fusion": fusion}
    import_original(save_original(tmp_path / "orig.pt", state), run, tmp_path / "imported")
    model, _, _ = load_checkpoint(tmp_path / "imported")
    tokens = [torch.randn(2, 1024, D) for _ in range(4)]
    with torch.no_grad():
        got, _ = model.fusion(tokens)
    if kind == "channel_concat":  # concatenate along channels, then the linear layer
        want = torch.nn.functional.linear(torch.cat(tokens, -1), fusion["projector.weight"], fusion["projector.bias"])
    else:  # (stack(tokens) * softmax(scalar)).sum(0)
        want = (torch.stack(tokens, 0) * fusion["scalar"].softmax(0)[:, None, None, None]).sum(0)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.fixture
def original(frozen):
    """A fresh copy of the original-layout ``model`` dict to damage."""
    return {g: dict(v) for g, v in frozen["state"].items()}


def test_three_projectors_for_four_encoders_is_an_error(frozen, original, tmp_path):
    del original["projectors"]["3.projector.projector.weight"], original["projectors"]["3.projector.projector.bias"]
    with pytest.raises(ConversionError, match=r"projectors \[0, 1, 2\] but the config has 4 encoders"):
        import_original(save_original(tmp_path / "three.pt", original), frozen["run"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("empty", [{}, None])
def test_an_empty_fusion_group_is_a_clear_error(frozen, original, tmp_path, empty):
    if empty is None:
        del original["feature_fusion"]
    else:
        original["feature_fusion"] = empty
    with pytest.raises(ConversionError, match=r"fusion group \(feature_fusion/adapter\) is empty"):
        import_original(save_original(tmp_path / "nofusion.pt", original), frozen["run"], tmp_path / "out")


def test_a_missing_or_misshapen_tensor_is_named(frozen, original, tmp_path):
    del original["llm_backbone"]["llm.model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match=r"missing tensors llm.model.layers.1.mlp.up_proj.weight"):
        import_original(save_original(tmp_path / "missing.pt", original), frozen["run"], tmp_path / "out")
    # a config without the original's <PAD> and padding: the rows differ and the message says what to set
    data = frozen["run"].to_dict()
    data["model"]["llm"] |= {"add_special_tokens": {}, "pad_vocab_to_multiple_of": None}
    with pytest.raises(ConversionError, match=r"32064 embedding rows, the configured one 32000.*pad_vocab_to_multiple"):
        import_original(frozen["path"], run_config_from_dict(data), tmp_path / "out")


def test_loading_back_is_strict(frozen, tmp_path):
    """A folder whose weights lost a tensor or changed a shape is refused, naming the file and the tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "imported"
    shutil.copytree(frozen["root"] / "imported", folder)
    state = load_file(str(folder / WEIGHTS))
    state["fusion.key.bias"] = state["fusion.key.bias"][:-1].clone()
    save_file(state, str(folder / WEIGHTS))
    with pytest.raises(
        IntegrityError,
        match=rf"{WEIGHTS}: .*tensor fusion.key.bias: shape \[{A - 1}\] in the file, the model expects \[{A}\]",
    ):
        load_checkpoint(folder)
    del state["fusion.key.bias"]
    save_file(state, str(folder / WEIGHTS))
    with pytest.raises(IntegrityError, match=rf"{WEIGHTS}: missing tensors fusion.key.bias$"):
        load_checkpoint(folder)


def test_the_import_never_reads_the_llm_folders_weights(frozen, tmp_path):
    """The configured LLM is only built on the meta device to check shapes against (its weights would be a second
    copy in memory: benchmarks/import_memory.py measures one copy per byte of checkpoint)."""
    import shutil

    shutil.copytree(frozen["run"].model.llm.weights, tmp_path / "llm", ignore=shutil.ignore_patterns("*.safetensors"))
    data = frozen["run"].to_dict()
    data["model"]["llm"]["weights"] = str(tmp_path / "llm")
    import_original(frozen["path"], run_config_from_dict(data), tmp_path / "out")
    assert (tmp_path / "out" / WEIGHTS).stat().st_size > 32064 * D * 4 * 2


def test_the_digest_is_streamed(tmp_path):
    blob = torch.randn(1000).numpy().tobytes() * 7
    (tmp_path / "f").write_bytes(blob)
    assert file_sha256(tmp_path / "f", chunk=4096) == hashlib.sha256(blob).hexdigest()


def test_malicious_pickle_is_refused(frozen, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"projectors": Evil(str(marker))}}, tmp_path / "evil.pt")
    with pytest.raises(ConversionError, match="refused to load"):
        import_original(tmp_path / "evil.pt", frozen["run"], tmp_path / "out")
    assert not marker.exists(), "the pickled payload must never run"
    assert not (tmp_path / "out").exists()


def test_wrong_layout_is_a_clear_error(frozen, tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="expected a dict with a 'model' entry"):
        import_original(tmp_path / "other.pt", frozen["run"], tmp_path / "out")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ConversionError, match="not a PyTorch checkpoint"):
        import_original(tmp_path / "text.pt", frozen["run"], tmp_path / "out")
