"""Presets load, and a bad one fails at load with a message naming the file and the key."""

from __future__ import annotations

import pytest

from cascade_core.presets import PresetError, list_presets, load_preset

GOOD_STAGE = """
[[stages]]
name = "small"
backend = "packaged"
model = "smollm2-135m"
"""


def write(tmp_path, text: str):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


def test_shipped_presets_all_load():
    names = list_presets()
    assert {"default", "api-recorded", "gpu-qwen3", "gpu-llama", "api-gpt4o"} <= set(names)
    for name in names:
        preset = load_preset(name)
        assert preset.stages, name


def test_default_preset_is_the_offline_three_stage_cascade():
    preset = load_preset("default")
    assert [s.model for s in preset.stages] == ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    assert [s.model for s in preset.extra_stages] == ["gemma3-270m"]
    assert not preset.needs_network


def test_api_recorded_ends_with_recorded_gpt4():
    last = load_preset("api-recorded").stages[-1]
    assert last.backend == "recorded" and last.model == "gpt-4-1106-preview"


@pytest.mark.parametrize(
    "extra, key, words",
    [
        ('colour = "red"', "stages.0.colour", "unknown key"),
        ("tau_t = 2", "stages.0.tau_t", "[0, 1]"),
        ("tau_ik = -1", "stages.0.tau_ik", "[0, 1]"),
        ("tau_t = nan", "stages.0.tau_t", "[0, 1]"),
        ('tau_t = "high"', "stages.0.tau_t", "number"),
        ('rule = "majority"', "stages.0.rule", "both"),
        ("batch_size = 0", "stages.0.batch_size", "greater than"),
    ],
)
def test_bad_stage_key_is_named(tmp_path, extra, key, words):
    path = write(tmp_path, 'name = "x"\n' + GOOD_STAGE + extra + "\n")
    with pytest.raises(PresetError) as err:
        load_preset(path)
    message = str(err.value)
    assert str(path) in message and key in message and words in message


def test_missing_model_is_named(tmp_path):
    path = write(tmp_path, 'name = "x"\n[[stages]]\nname = "a"\nbackend = "hf"\n')
    with pytest.raises(PresetError, match=r"stages\.0\.model: Field required"):
        load_preset(path)


def test_recorded_stage_must_be_last(tmp_path):
    text = 'name = "x"\n[[stages]]\nname = "r"\nbackend = "recorded"\nmodel = "gpt-4-1106-preview"\n' + GOOD_STAGE
    with pytest.raises(PresetError, match="can only be the last stage"):
        load_preset(write(tmp_path, text))


def test_openai_stage_needs_api_base_and_key_env_is_a_name(tmp_path):
    base = 'name = "x"\n[[stages]]\nname = "o"\nbackend = "openai"\nmodel = "gpt-4o"\n'
    with pytest.raises(PresetError, match="api_base"):
        load_preset(write(tmp_path, base))
    with pytest.raises(PresetError, match="NAME of an environment variable"):
        load_preset(write(tmp_path, base + 'api_base = "http://127.0.0.1:1/v1"\napi_key_env = "sk-abc def"\n'))


def test_not_toml_and_unknown_names(tmp_path):
    with pytest.raises(PresetError, match="not valid TOML"):
        load_preset(write(tmp_path, "name = [unclosed"))
    with pytest.raises(PresetError, match="unknown preset 'nope'.*default"):
        load_preset("nope")
    with pytest.raises(PresetError, match="not found"):
        load_preset(tmp_path / "missing.toml")


def test_duplicate_stage_names_and_all_disabled(tmp_path):
    with pytest.raises(PresetError, match="unique"):
        load_preset(write(tmp_path, 'name = "x"\n' + GOOD_STAGE + GOOD_STAGE))
    with pytest.raises(PresetError, match="at least one stage must be enabled"):
        load_preset(write(tmp_path, 'name = "x"\n' + GOOD_STAGE + "enabled = false\n"))


def test_learned_rule_needs_a_combiner_file(tmp_path):
    with pytest.raises(PresetError, match="combiner"):
        load_preset(write(tmp_path, 'name = "x"\n' + GOOD_STAGE + 'rule = "learned"\n'))


def test_learned_combiner_is_read_into_the_policy(tmp_path):
    import json

    import numpy as np

    from cascade_core.policy import fit_combiner
    from cascade_core.compose.live import stage_policy

    rng = np.random.default_rng(0)
    p_t = rng.uniform(0.25, 1, 400)
    correct = rng.uniform(size=400) < p_t
    combiner = fit_combiner(p_t, np.full(400, np.nan), 1 - p_t, p_t * 0 + 1.0, correct)
    (tmp_path / "c.json").write_text(json.dumps(combiner.to_dict()))
    text = 'name = "x"\n' + GOOD_STAGE + f'rule = "learned"\ncombiner = "{tmp_path / "c.json"}"\n'
    policy = stage_policy(load_preset(write(tmp_path, text)).stages[0])
    assert policy.rule == "learned" and policy.combiner == combiner



def test_gemma3_270m_is_labelled_a_base_model_where_stages_are_listed_or_picked(capsys):
    """Its GGUF is the base model (no chat template): its label says so, and the label is what the CLI's
    preset listing, the app's stage pickers (`view_model.label_of`) and the model catalog show."""
    from app_ui.view_model import label_of
    from cascade_core.cli import main
    from models.packaged import PACKAGED_MODELS

    gemma = load_preset("default").stage("gemma3-270m")
    assert "base model" in gemma.label and "not instruction-tuned" in gemma.label
    assert label_of(gemma) == gemma.label
    assert "not instruction-tuned" in PACKAGED_MODELS["gemma3-270m"].label
    assert main(["presets"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "gemma3-270m" in line]
    assert listed == [f"{'':<14} extra stage gemma3-270m: {gemma.label}"]
    assert main(["presets", "--stages", "default"]) == 0  # the scripts' form: names only, extras not run
    assert capsys.readouterr().out.split() == ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
