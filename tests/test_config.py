"""Config resolution: precedence, validation and the --print-config / --set flags."""


import pytest
import yaml

from dlcli import config
from dlcli.errors import UsageError

DEFAULTS = {"epochs": 5, "lr": 0.1, "batch_size": 32, "seed": 42, "dataset": "x", "model": {"units": 64, "act": "relu"}}


def test_precedence_defaults_file_set_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 7\nlr: 0.5\nmodel:\n  units: 10\n")
    cfg = config.resolve(DEFAULTS, cfg_file, sets=["lr=0.25", "model.units=20"], flags={"lr": 0.125, "batch_size": None})
    assert cfg["epochs"] == 7  # file beats default
    assert cfg["model"]["units"] == 20  # --set beats file
    assert cfg["lr"] == 0.125  # flag beats --set
    assert cfg["batch_size"] == 32  # an absent flag changes nothing
    assert cfg["model"]["act"] == "relu"


def test_set_values_are_yaml_scalars():
    assert config.parse_set("a=3") == ("a", 3)
    assert config.parse_set("a=1e-3") == ("a", 1e-3)
    assert config.parse_set("a=true") == ("a", True)
    assert config.parse_set("a=null") == ("a", None)
    assert config.parse_set("a.b=hello") == ("a.b", "hello")
    with pytest.raises(UsageError, match="key=value"):
        config.parse_set("novalue")


@pytest.mark.parametrize(
    "sets, message",
    [
        (["nope=1"], "unknown config key 'nope'.*known keys: epochs"),
        (["model.width=3"], "unknown config key 'model.width'"),
        (["epochs=-1"], "'epochs' must be an integer >= 1"),
        (["epochs=2.5"], "'epochs' must be an integer"),
        (["batch_size=0"], "'batch_size' must be an integer >= 1"),
        (["lr=.nan"], "'lr' must be a finite number"),
        (["lr=0"], "'lr' must be a number > 0"),
        (["lr=fast"], "'lr' must be a number"),
        (["model=3"], "'model' must be a mapping"),
    ],
)
def test_bad_values_are_refused_naming_the_key(sets, message):
    with pytest.raises(UsageError, match=message):
        config.resolve(DEFAULTS, sets=sets)


def test_choices_are_enforced():
    with pytest.raises(UsageError, match="must be one of relu, tanh"):
        config.resolve(DEFAULTS, sets=["model.act=gelu"], choices={"model.act": ["relu", "tanh"]})


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        config.resolve(DEFAULTS, bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="mapping"):
        config.resolve(DEFAULTS, listing)
    with pytest.raises(UsageError, match="cannot read config file"):
        config.resolve(DEFAULTS, tmp_path / "missing.yaml")


def test_yaml_loader_is_safe(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("epochs: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        config.resolve(DEFAULTS, evil)


def test_print_config_through_the_cli(cli, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 3\nl2: 0.01\n")
    result = cli("train", "linear", "--config", cfg_file, "--set", "lr=0.2", "--epochs", "4",
                 "--optimizer", "rmsprop", "--print-config")
    cfg = yaml.safe_load(result.stdout)
    assert cfg["epochs"] == 4 and cfg["lr"] == 0.2 and cfg["l2"] == 0.01 and cfg["optimizer"] == "rmsprop"
    assert not cli.root.exists()  # nothing trained, nothing written


def test_bad_config_key_on_the_cli_is_one_line_exit_2(cli):
    result = cli("train", "linear", "--set", "epochz=3", expect=2)
    assert "unknown config key 'epochz'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    result = cli("train", "linear", "--optimizer", "adamw", expect=2)
    assert "must be one of sgd, momentum" in result.stderr
    result = cli("train", "linear", "--epochs", "0", expect=2)
    assert "'epochs' must be an integer >= 1" in result.stderr


def test_config_file_reads_1e_minus_3_as_a_number(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 1e-3\nmodel:\n  units: 1E2\n")  # YAML 1.1 would keep these strings
    with pytest.raises(UsageError, match="'model.units' must be an integer"):
        config.resolve(DEFAULTS, cfg_file)  # 1E2 is a float, refused where an int belongs
    cfg_file.write_text("lr: 1e-3\nepochs: 2\n")
    assert config.resolve(DEFAULTS, cfg_file)["lr"] == 1e-3
    cfg_file.write_text("dataset: '1e-3'\n")  # a quoted value stays a string
    assert config.resolve(DEFAULTS, cfg_file)["dataset"] == "1e-3"


def test_data_identity_tells_other_data_from_the_same_data_written_differently(tmp_path, monkeypatch):
    from dlcli.data.sources import data_identity

    monkeypatch.chdir(tmp_path)
    assert data_identity("npz:./a.npz") == data_identity(f"npz:{tmp_path}/a.npz")
    assert data_identity("npz:a.npz") != data_identity("npz:b.npz")
    assert data_identity("folder:a", data_dir="x") == data_identity("folder:a")  # --data-dir is for tfds names
    assert data_identity("mnist", data_dir="x") != data_identity("mnist", data_dir="y")
    assert data_identity("mnist") != data_identity("tfds:cifar10")
