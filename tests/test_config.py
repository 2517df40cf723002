from pathlib import Path

import pytest

from orthodiff.config import CONFIG_DIR, config_from_dict, config_to_dict, load_config
from orthodiff.errors import OrthodiffError


def test_defaults_are_the_papers_reference_denoiser():
    config = load_config()
    assert config.model.base_channels == 64
    assert config.model.channel_mult == [1, 1, 2, 2, 4]
    assert config.diffusion.beta_schedule == "squaredcos_cap_v2"
    assert config.diffusion.num_train_timesteps == 1000


def test_files_layer_left_to_right_then_overrides():
    config = load_config(["tiny"], ["model.base_channels=16", "seed=7"])
    assert config.model.base_channels == 16  # override beats the file
    assert config.model.channel_mult == [1, 2, 2]  # from the file
    assert config.seed == 7


def test_section_short_keys():
    config = load_config([], ["plane=axial", "max_steps=3"], section="pretrain")
    assert config.pretrain.plane == "axial"
    assert config.pretrain.max_steps == 3


def test_unknown_key_is_one_clear_line():
    with pytest.raises(OrthodiffError) as info:
        load_config([], ["pretrain.max_stepz=3"])
    message = str(info.value)
    assert "pretrain.max_stepz" in message and "does not exist" in message
    assert "\n" not in message


def test_wrong_type_names_the_key():
    with pytest.raises(OrthodiffError, match="pretrain.batch_size"):
        load_config([], ["pretrain.batch_size=many"])


def test_missing_file_and_malformed_override():
    with pytest.raises(OrthodiffError, match="not found"):
        load_config(["no-such-config.yaml"])
    with pytest.raises(OrthodiffError, match="key=value"):
        load_config([], ["seed"])


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  widths: [1, 2]\n")
    with pytest.raises(OrthodiffError, match=str(path)):
        load_config([path])


def test_round_trip_through_dict():
    config = load_config(["tiny"], ["seed=3"])
    assert config_from_dict(config_to_dict(config)) == config


def test_shipped_presets_load():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        load_config([path])


def test_unparsable_override_value_is_one_clear_line():
    with pytest.raises(OrthodiffError, match="not valid YAML"):
        load_config([], ["data.plane_size={sagittal:[4,16,16]}"])


def test_yaml_whose_top_level_is_a_list_is_one_line(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- seed: 1\n- data: {}\n")
    with pytest.raises(OrthodiffError, match=r"list.yaml: the top level is a list, not a mapping"):
        load_config([path])


def test_broken_yaml_names_its_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 1\ndata:\n  cache: [a, b\n  splits: x\n")
    with pytest.raises(OrthodiffError, match=r"broken.yaml: invalid YAML at line 4, column 9") as info:
        load_config([path])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, kind", [("hello\n", "the value 'hello'"), ("42\n", "the number 42"),
                                        ("true\n", "the value True")])
def test_yaml_whose_top_level_is_a_scalar_is_one_line(text, kind, tmp_path):
    path = tmp_path / "scalar.yaml"
    path.write_text(text)
    with pytest.raises(OrthodiffError) as info:
        load_config([path])
    assert str(info.value) == (f"config file {path}: the top level is {kind}, not a mapping of sections; "
                               "write keys such as `seed: 0` and `data:` at the top level")


def test_a_bare_name_is_a_preset_whatever_the_working_folder_holds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("tiny").write_text("seed: 9\n")
    Path("demo").mkdir()
    assert load_config(["tiny"]).model.base_channels == 8  # configs/tiny.yaml, not ./tiny
    assert load_config(["tiny"]).seed == 0
    assert load_config(["demo"]) == load_config([CONFIG_DIR / "demo.yaml"])
    assert load_config(["./tiny"]).seed == 9  # a path names the file


def test_an_unknown_preset_lists_the_presets_and_the_path_form():
    with pytest.raises(OrthodiffError) as info:
        load_config(["tinny"])
    assert str(info.value) == ("config preset 'tinny' does not exist; presets: demo, demo-quick, reference, tiny "
                               "(for a file in this folder write ./tinny)")


def test_a_folder_given_as_a_config_path_is_one_line(tmp_path):
    folder = tmp_path / "experiment.yaml"
    folder.mkdir()
    with pytest.raises(OrthodiffError) as info:
        load_config([folder])
    assert str(info.value) == f"config file {folder}: is a folder; give a YAML file"
