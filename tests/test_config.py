"""Config: paper defaults, dotted overrides, and load-time errors that name the key and what is allowed."""

from __future__ import annotations

import pytest

from orpo_distill.config import (
    VARIANTS,
    Config,
    ConfigError,
    apply_overrides,
    config_reference,
    dump_config,
    load_config,
)


def test_paper_defaults():
    c = Config()
    assert c.sampling.k == 8 and c.sampling.temperature == 0.8 and c.sampling.rouge_threshold == 0.8
    assert c.objective.lam == 1.0 and c.policy.phi == 0.5 and c.trainer.epochs == 5
    assert c.objective.nll_scope == "completion" and not c.trainer.lora.enabled
    assert not c.teacher.trust_remote_code and not c.student.trust_remote_code
    assert tuple(c.run.variants) == VARIANTS


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainer:\n  lr: 2.0e-5\npolicy:\n  phi: 0.25\n")
    c = load_config(p, ["trainer.lr=1e-5", "objective.lam=0.1", "run.variants=[orpo_off,zero_shot]",
                        "sampling.stop=['###']"])
    assert c.trainer.lr == 1e-5 and c.policy.phi == 0.25 and c.objective.lam == 0.1
    assert c.run.variants == ["orpo_off", "zero_shot"] and c.sampling.stop == ["###"]
    # a dump loads back to the same config
    p2 = tmp_path / "d.yaml"
    p2.write_text(dump_config(c))
    assert load_config(p2) == c


def test_overrides_are_pure():
    data = {"trainer": {"lr": 1.0}}
    out = apply_overrides(data, ["trainer.epochs=3"])
    assert data == {"trainer": {"lr": 1.0}} and out["trainer"] == {"lr": 1.0, "epochs": 3}


@pytest.mark.parametrize("override,needles", [
    ("trainer.lrr=1", ["trainer.lrr", "unknown key", "lr,"]),
    ("bogus.x=1", ["bogus", "unknown key", "trainer"]),
    ("policy.phi=1.5", ["policy.phi", "less than or equal to 1"]),
    ("sampling.k=0", ["sampling.k", "greater than or equal to 1"]),
    ("policy.schedule=cosine", ["policy.schedule", "'constant', 'linear' or 'adaptive'"]),
    ("objective.nll_scope=prompt", ["objective.nll_scope", "'completion' or 'all'"]),
    ("trainer.epochs=many", ["trainer.epochs", "valid integer"]),
    ("run.variants=[orpo_best]", ["run.variants.0", "orpo_mixed"]),
])
def test_bad_values_fail_at_load_time(override, needles):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_bad_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("trainer:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(p)
    p.write_bytes(b"trainer:\n  lr: \xff\xfe\n")
    with pytest.raises(ConfigError, match="bad.yaml.*UTF-8"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    p.write_text("teacher:\n  api_key: sk-123\n")
    with pytest.raises(ConfigError, match="teacher.api_key.*unknown key.*api_key_env"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_reference_lists_every_key():
    ref = config_reference()
    for key in ("trainer.lr", "policy.phi", "objective.lam", "sampling.rouge_threshold", "trainer.lora.r",
                "teacher.api_key_env", "task.train.path"):
        assert f"`{key}`" in ref


def test_docs_config_reference_is_generated_from_the_schema():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert config_reference() in doc, "docs/CONFIG.md is stale: regenerate it with `orpo-distill config reference`"


def test_example_configs_load():
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
    assert examples
    for p in examples:
        load_config(p)
