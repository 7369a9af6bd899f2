import dataclasses
import json
import math

import pytest
import torch

from merv.checkpoint import read_meta
from merv.config import resolve_run_config
from merv.models.merv import MERV
from merv.train.loop import set_trainable, train_stage, warmup_cosine
from merv.train.strategy import make_optimizer
from tests.conftest import tiny_overrides


def test_warmup_cosine():
    total, warm = 10, 2
    lrs = [warmup_cosine(s, total, warm) for s in range(total)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False)), "monotone decay after warmup"


def test_encoders_cannot_be_trained(tiny_model):
    with pytest.raises(ValueError, match="encoders are frozen"):
        set_trainable(tiny_model, ("encoders", "projectors"))


def test_no_weight_decay_on_biases_and_norms(tiny_model, tiny_run):
    set_trainable(tiny_model, ("projectors", "fusion", "llm"))
    opt = make_optimizer(tiny_model, tiny_run.train.stage("finetune"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    n_trainable = sum(1 for p in tiny_model.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable
    assert not any(p.requires_grad for p in tiny_model.encoders.parameters())
    # as the original's AdamW groups (ndim <= 1 or a bias: no decay): its query Q [1, A], W_q and W_k decay
    fusion = tiny_model.fusion
    assert all(any(p is q for q in decay["params"]) for p in (fusion.query, fusion.q_proj.weight, fusion.key.weight))
    assert all(any(p is q for q in no_decay["params"]) for p in (fusion.q_proj.bias, fusion.key.bias))
    tiny_model.requires_grad_(False)
    tiny_model.eval()


def test_a_stage_can_start_from_the_projectors_only(tiny_run, tmp_path):
    """init_groups [projectors] (the original's finetune after align): only the projectors come from the previous
    stage's checkpoint; the fusion starts afresh and the LLM from its folder."""
    from merv.checkpoint import save_checkpoint
    from merv.train.loop import build_model

    previous = MERV.from_config(tiny_run.model)
    with torch.no_grad():
        for p in previous.parameters():
            p.add_(1.0)
    meta = {"trained_groups": ["fusion", "llm", "projectors"], "config_fingerprint": "prev"}
    save_checkpoint(previous, tiny_run, tmp_path / "prev", meta)
    folder = MERV.from_config(tiny_run.model)
    for init_groups, carried in ((("projectors",), {"projectors"}), (None, {"projectors", "fusion", "llm"})):
        stage = dataclasses.replace(tiny_run.train.stage("align"), init_groups=init_groups)
        model, trained, fingerprint = build_model(tiny_run, stage, tmp_path / "prev")
        for group in ("projectors", "fusion", "llm"):
            got = dict(getattr(model, group).named_parameters())
            same = [torch.equal(got[n], p) for n, p in getattr(previous, group).named_parameters()]
            assert all(same) if group in carried else not any(same), (init_groups, group)
        assert torch.equal(model.llm.lm_head.weight, (previous if "llm" in carried else folder).llm.lm_head.weight)
        assert trained == {"projectors", "fusion"} | carried and fingerprint == "prev"


@pytest.fixture(scope="module")
def two_stages(tiny_run, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    align = train_stage(tiny_run, "align", shards["align"], out / "align", progress=False)
    finetune = train_stage(
        tiny_run, "finetune", shards["finetune"], out / "finetune", init=out / "align", progress=False
    )
    return out, align, finetune


def test_stage_checkpoints_are_self_describing(two_stages):
    out, align, finetune = two_stages
    assert align["trained_groups"] == ["fusion", "projectors"]
    assert finetune["trained_groups"] == ["fusion", "llm", "projectors"]
    assert finetune["init"] == str(out / "align")
    assert align["step"] == math.ceil(12 * 1 / 16)  # 12 samples, 1 epoch, global batch 16
    config = json.loads((out / "finetune" / "config.json").read_text())
    meta = read_meta(out / "finetune")
    assert meta.pop("trained_config") == config, "meta.json records the config the weights were trained with"
    assert meta == finetune
    assert config["model"]["name"] == "merv-tiny"
    metrics = [json.loads(line) for line in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == finetune["step"] and all(math.isfinite(m["loss"]) for m in metrics)
    assert finetune["config_fingerprint"] != align["config_fingerprint"]
    assert all(m["tokens_per_s"] > 0 and m["mfu"] is None for m in metrics), "MFU only where a GPU sets the peak"
    png = (out / "finetune" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, "one offline wandb run per stage"


def test_checkpoint_stores_only_trained_groups(two_stages):
    from safetensors.torch import load_file

    out, _, _ = two_stages
    groups = {k.split(".")[0] for k in load_file(str(out / "align" / "model.safetensors"))}
    assert groups == {"projectors", "fusion"}
    groups = {k.split(".")[0] for k in load_file(str(out / "finetune" / "model.safetensors"))}
    assert groups == {"projectors", "fusion", "llm"}


def test_training_is_deterministic(tiny_run, shards, two_stages, tmp_path):
    from safetensors.torch import load_file

    out, align, _ = two_stages
    again = train_stage(tiny_run, "align", shards["align"], tmp_path / "align", progress=False)
    assert again["final_loss"] == align["final_loss"]
    a = load_file(str(out / "align" / "model.safetensors"))
    b = load_file(str(tmp_path / "align" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_goes_down_when_overfitting(tiny_run, shards, tmp_path):
    run = resolve_run_config(
        "merv-tiny",
        tiny_overrides_from(tiny_run) | {"train": {"stages": {"finetune": {"epochs": 8, "lr": 3e-3}}}},
    )
    meta = train_stage(run, "finetune", shards["finetune"], tmp_path / "ft", progress=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert meta["final_loss"] < 0.6 * losses[0]


def tiny_overrides_from(run) -> dict:
    from pathlib import Path

    return tiny_overrides(Path(run.model.llm.weights).parent)


def test_a_sentencepiece_llm_trains_on_its_answers(tiny_run, shards, spm_llm, tmp_path):
    """A Llama-2-style SentencePiece tokenizer (both tokenizer.json forms): the labels of a training sample decode to
    exactly its answers, each followed by EOS, and the stage trains."""
    from merv.data.batching import ExampleBuilder
    from merv.data.shards import iter_samples
    from merv.models.merv import MERV
    from merv.prompting import IGNORE_INDEX

    overrides = tiny_overrides_from(tiny_run)
    overrides["model"]["llm"]["weights"] = str(spm_llm)
    overrides["train"] = {"stages": {"finetune": {"epochs": 1, "global_batch_size": 4, "micro_batch_size": 2}}}
    run = resolve_run_config("merv-tiny", overrides)
    model = MERV.from_config(run.model)
    tok = model.tokenizer
    for sample in list(iter_samples(shards["finetune"]))[:4]:
        ex = ExampleBuilder(model.cfg, tok)(sample)
        spans, current = [], []
        for token, label in zip(ex["input_ids"], ex["labels"], strict=True):
            if label != IGNORE_INDEX:
                current.append(token)
            elif current:
                spans.append(current)
                current = []
        spans += [current] if current else []
        answers = [t["value"] + "</s>" for t in sample["meta"]["conversations"] if t["from"] == "gpt"]
        assert [tok.decode(s) for s in spans] == answers
    meta = train_stage(run, "finetune", shards["finetune"], tmp_path / "ft", progress=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert meta["step"] == 3 and len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_the_fast_paths_give_the_plain_losses(tiny_run, shards, tmp_path):
    """The LM head on target positions only ("targets", the default) against every position's logits ("all", the
    LLM's own forward): the same losses and weights up to float rounding (a matrix product over fewer rows may sum
    in another order: ~1e-7 relative; 1e-5 catches any real difference, which moves the loss at once)."""
    runs = {}
    for logits in ("all", "targets"):
        run = resolve_run_config(
            "merv-tiny",
            tiny_overrides_from(tiny_run) | {"train": {"stages": {"finetune": {"epochs": 2, "loss_logits": logits}}}},
        )
        meta = train_stage(run, "finetune", shards["finetune"], tmp_path / logits, progress=False)
        records = [json.loads(x) for x in (tmp_path / logits / "metrics.jsonl").read_text().splitlines()]
        runs[logits] = (meta, [r["loss"] for r in records])
        assert all(r["data_wait_s"] <= r["step_s"] for r in records), "the data wait of each step is logged"
        assert meta["strategy"] == {"device": "cpu", "compute": "fp32", "fsdp": None, "kernels": "plain",
                                    "compile": False, "loss_logits": logits}  # fmt: skip
    assert runs["all"][1] == pytest.approx(runs["targets"][1], rel=1e-5)
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("all", "targets"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


@pytest.mark.slow
def test_compiled_blocks_give_the_plain_losses(tiny_run, shards, tmp_path):
    """``compile: true`` (each LLM block through torch.compile; Inductor's C++ backend here, Triton on GPUs) trains
    the same model as the plain path: kernels fuse and reorder float sums (~1e-6 relative on this model), so 1e-4
    leaves room and still catches a real difference (a wrong mask or position moves the loss at the first digit)."""
    losses = {}
    for compiled in (False, True):
        stages = {"finetune": {"epochs": 1, "compile": compiled}}
        run = resolve_run_config("merv-tiny", tiny_overrides_from(tiny_run) | {"train": {"stages": stages}})
        meta = train_stage(run, "finetune", shards["finetune"], tmp_path / str(compiled), progress=False)
        assert meta["strategy"]["compile"] is compiled
        lines = (tmp_path / str(compiled) / "metrics.jsonl").read_text().splitlines()
        losses[compiled] = [json.loads(x)["loss"] for x in lines]
    assert len(losses[True]) >= 1 and losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_bf16_parameters_under_the_fsdp2_policy_on_one_process(tiny_run, shards, tmp_path):
    """What a single GPU runs with mixed_precision bf16 (FSDP2's policy on a one-process group: bf16 compute, fp32
    master weights), here on the CPU: the losses follow the fp32 run to bf16 precision (~3 significant digits)."""
    from merv.train.distributed import Dist
    from merv.train.strategy import Strategy

    run = resolve_run_config("merv-tiny", tiny_overrides_from(tiny_run))
    stage = dataclasses.replace(run.train.stage("finetune"), mixed_precision="bf16")
    torch.manual_seed(0)  # projectors and fusion start from the global generator: the reference must draw the same
    model = MERV.from_config(run.model)
    set_trainable(model, stage.trainable)
    strategy = Strategy(stage, Dist(), fsdp=True)  # as on a GPU
    model = strategy.prepare(model)
    from merv.data.batching import ExampleBuilder, collate
    from merv.data.shards import iter_samples

    build = ExampleBuilder(model.cfg, model.tokenizer)
    batch = collate([build(s) for s, _ in zip(iter_samples(shards["finetune"]), range(4), strict=False)])
    torch.manual_seed(0)
    reference = MERV.from_config(run.model)
    with torch.no_grad():
        want, n, _ = reference(batch["videos"], batch["input_ids"], batch["labels"], batch["lengths"])
    got, _ = strategy.micro_step(model, batch, 1.0, last=True)
    assert type(model).__name__.startswith("FSDP") and torch.isfinite(got)
    assert float(got / n) == pytest.approx(float(want / n), rel=2e-2)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads), "fp32 master weights and gradients"
    torch.distributed.destroy_process_group()  # the one-process group the strategy made


def test_liger_kernels_need_a_gpu(tiny_run):
    from merv.train.distributed import Dist
    from merv.train.strategy import Strategy

    stage = dataclasses.replace(tiny_run.train.stage("finetune"), kernels="liger")
    with pytest.raises(ValueError, match="kernels 'liger' needs a CUDA device"):
        Strategy(stage, Dist(device="cpu"))
