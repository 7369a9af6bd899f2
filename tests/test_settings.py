"""One place per default: every key of the pipeline config (walked recursively from the JSON schema and from the
typed records) has one default, its record's (merv.settings), and the schema, the command line and config.yaml say
the same. A key added anywhere without the others fails here with the key named."""

import dataclasses
import typing

import pytest
import yaml

from merv.cli import build_parser
from merv.eval.judge import resolve_judge_config
from merv.pipeline import PipelineConfig, parse_pipeline_config
from merv.settings import SECTIONS, JudgeSection
from tests.helpers import REPO

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
CONFIG = yaml.safe_load((REPO / "config/config.yaml").read_text())
MISSING = dataclasses.MISSING

# Keys no command-line option stands for, and why (a key added to the config must get an option or a line here).
NO_OPTION = {
    "pipeline.models": "what snakemake builds, read by the workflow only",
    "data.train.*.json": "paths: a command's positional inputs",
    "data.train.*.root": "passed as merv shard --root (no default)",
    "data.benchmarks": "paths: a command's positional inputs",
    "shards.sets": "a shard set is --frames and --size of one merv shard call (required options)",
    "shards.sets.*.size": "merv shard --size (required)",
    "shards.sets.*.frames": "merv shard --frames (required)",
    "models.*.preset": "a run config (merv train --config ...)",
    "models.*.weights": "which rule builds or fetches the weights",
    "models.*.overrides": "a run config (merv train --config ...)",
    "models.*.pretrained_encoders": "a run config (merv train --config ...)",
    "pretrain.*": "one entry is merv pretrain --config (JSON)",
    "report.*": "merv report --spec (JSON)",
}
# Values config.yaml sets on purpose away from the default (a section's other keys spell out the defaults).
DELIBERATE = {"shards.sets": "adds the paper-size set", "report.main": "the demo's tables",
              "report.fusion_ablation": "the demo's tables", "report.fusion_weights": "the demo's figure"}  # fmt: skip


def plain(value):
    """A record default as YAML would write it (tuples as lists, records as mappings)."""
    if dataclasses.is_dataclass(value):
        return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def record_type(hint):
    """The record behind a field type (``X``, ``X | None``), else None."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is not dict else []
    for candidate in [hint, *options]:
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def walk(schema: dict, record: type, path: str, in_entry: bool = False):
    """Every key: ``(path, schema of the key, field, its type, in a mapping's entry)``, recursively; fails naming a
    key that only one of schema and record has."""
    props = schema.get("properties", {})
    fields = {f.name: f for f in dataclasses.fields(record)}
    hints = typing.get_type_hints(record)
    only_schema, only_record = sorted(set(props) - set(fields)), sorted(set(fields) - set(props))
    assert not only_schema, f"{[f'{path}{k}' for k in only_schema]}: in the schema but not in {record.__name__}"
    assert not only_record, f"{[f'{path}{k}' for k in only_record]}: in {record.__name__} but not in the schema"
    for name, field in fields.items():
        key, sub, hint = f"{path}{name}", props[name], hints[name]
        yield key, sub, field, hint, in_entry
        if record_type(hint):
            yield from walk(sub, record_type(hint), key + ".", in_entry)
        elif typing.get_origin(hint) is dict and record_type(typing.get_args(hint)[1]):
            yield from walk(sub["additionalProperties"], typing.get_args(hint)[1], key + ".*.", True)


KEYS = list(walk(SCHEMA, PipelineConfig, ""))


def field_default(field):
    if field.default is not MISSING:
        return plain(field.default)
    if field.default_factory is not MISSING:
        return plain(field.default_factory())
    return MISSING


def test_every_key_is_walked():
    names = {k for k, *_ in KEYS}
    assert {"synth.train_videos", "shards.strict", "eval.judge.max_attempts", "models.*.weights"} <= names
    assert {"pretrain.*.steps", "data.train.*.root", "report.fusion_weights.model", "launch.time_min"} <= names


@pytest.mark.parametrize(("key", "schema", "field", "hint", "in_entry"), KEYS, ids=[k for k, *_ in KEYS])
def test_schema_default_is_the_records(key, schema, field, hint, in_entry):
    default = field_default(field)
    if default is MISSING:
        assert "default" not in schema, f"{key}: the schema has a default, the record none (a required key)"
        return
    if isinstance(default, dict) and record_type(hint) and default == plain(record_type(hint)()):
        default = {}  # a section whose every key has its default: the schema fills it key by key
    if "default" not in schema:
        # inside a mapping's entries (models.<name>, pretrain.<name>): the record fills what is missing, and
        # Snakemake does not write the defaults into every entry; elsewhere only None may go unsaid
        assert in_entry or default is None, f"{key}: the record's default is {default!r}, the schema has none"
        return
    assert schema["default"] == default, f"{key}: schema default {schema['default']!r}, record {default!r}"


def options():
    """``{config key: (subcommand, action)}`` of every option standing for a config key."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    found = {}
    for command, p in sub.choices.items():
        for action in p._actions:
            if getattr(action, "config_key", None):
                found.setdefault(action.config_key, []).append((command, action))
    return found


def covered(key: str, table: dict) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in table)


@pytest.mark.parametrize(("key", "schema", "field", "hint", "in_entry"), KEYS, ids=[k for k, *_ in KEYS])
def test_command_line_default_is_the_records(key, schema, field, hint, in_entry):
    found = options().get(key)
    entries = typing.get_origin(hint) is dict and record_type(typing.get_args(hint)[1])
    if (record_type(hint) or entries) and not found:
        return  # a section or a mapping of entries: their keys are checked one by one
    if not found:
        assert covered(key, NO_OPTION), f"{key}: no command-line option names it and NO_OPTION does not list it"
        return
    assert not covered(key, NO_OPTION), f"{key}: has an option ({found[0][0]}) but NO_OPTION lists it"
    default = field_default(field)
    for command, action in found:
        if action.layered:  # flag, then environment, then config file, then the record's default
            assert action.default is None, f"merv {command} {action.option_strings[0]} ({key})"
            if default is not None:
                assert f"(default {default})" in action.help, f"merv {command} {action.option_strings[0]} ({key})"
        else:
            assert action.default == default, (
                f"{key}: merv {command} {action.option_strings[0]} defaults to {action.default!r}, the record "
                f"to {default!r}"
            )


def test_layered_judge_options_resolve_to_the_records_defaults():
    cfg = resolve_judge_config({"url": "http://judge.local/v1"}, env={}, section={})
    for f in dataclasses.fields(JudgeSection):
        if f.name != "url":
            assert getattr(cfg, f.name) == f.default, f"eval.judge.{f.name}"


def test_no_option_lists_only_real_keys():
    names = {k for k, *_ in KEYS}
    stale = [k for k in NO_OPTION if not (k in names or any(n.startswith(k[:-1]) for n in names if k.endswith("*")))]
    assert not stale, f"NO_OPTION lists keys the config does not have: {stale}"


def test_shipped_config_parses_and_spells_out_each_sections_defaults():
    parse_pipeline_config(CONFIG)  # every key known and typed
    for section, record in SECTIONS.items():
        values = CONFIG
        for part in section.split("."):
            values = values.get(part) or {}
        for f in dataclasses.fields(record):
            key = f"{section}.{f.name}"
            if record_type(typing.get_type_hints(record)[f.name]) and f.name in values:
                continue  # a subsection: walked as its own section
            if key in DELIBERATE:
                assert f.name in values, f"{key}: DELIBERATE lists it but config.yaml does not set it"
                continue
            assert f.name in values, f"{key}: config.yaml leaves it out (its default is {field_default(f)!r})"
            assert values[f.name] == field_default(f), (
                f"{key}: config.yaml says {values[f.name]!r}, the default is {field_default(f)!r}"
            )


def test_a_changed_default_is_caught():
    """The checks fail on a disagreement: the walk sees a default changed in the schema only."""
    changed = yaml.safe_load(yaml.safe_dump(SCHEMA))
    changed["properties"]["synth"]["properties"]["train_videos"]["default"] = 400
    row = next(r for r in walk(changed, PipelineConfig, "") if r[0] == "synth.train_videos")
    with pytest.raises(AssertionError, match="synth.train_videos: schema default 400, record 1200"):
        test_schema_default_is_the_records(*row)
    changed["properties"]["synth"]["properties"]["colour"] = {"type": "string"}
    with pytest.raises(AssertionError, match=r"\['synth.colour'\]: in the schema but not in SynthSection"):
        list(walk(changed, PipelineConfig, ""))
