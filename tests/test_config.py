import pytest

from scale_diffrec.config import DEFAULTS, load_config, parse_override
from scale_diffrec.data.errors import ConfigError


def test_overrides_apply_in_order_and_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\ndata:\n  source: parquet\n")
    cfg = load_config(path, ["epochs=3", "data.path=x.parquet", "denoiser.dims=[8, 16]",
                             "diffusion.reweight=false"])
    assert cfg["epochs"] == 3
    assert cfg["data"]["source"] == "parquet" and cfg["data"]["path"] == "x.parquet"
    assert cfg["denoiser"]["dims"] == [8, 16]
    assert cfg["diffusion"]["reweight"] is False
    assert cfg["diffusion"]["steps"] == DEFAULTS["diffusion"]["steps"]


def test_unknown_keys_name_the_dotted_key_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sourse: parquet\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*'data.sourse'"):
        load_config(path)
    with pytest.raises(ConfigError, match="'diffusion.stepz'"):
        load_config(None, ["diffusion.stepz=3"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("epochs")


def test_free_form_sections_pass_through():
    cfg = load_config(None, ["distributed.deepspeed.gradient_clipping=1.0"])
    assert cfg["distributed"]["deepspeed"] == {"gradient_clipping": 1.0}


def test_defaults_are_not_mutated():
    cfg = load_config(None, ["denoiser.dims=[1]"])
    cfg["topk"].append(5)
    assert DEFAULTS["denoiser"]["dims"] == [200, 600] and 5 not in DEFAULTS["topk"]


def test_numbers_without_a_dot_are_numbers_and_wrong_kinds_are_named():
    cfg = load_config(None, ["lr=1e-3", "ldiffrec.lr_vae=5e-4", "epochs=3.0"])
    assert cfg["lr"] == 0.001 and cfg["ldiffrec"]["lr_vae"] == 0.0005
    assert cfg["epochs"] == 3 and isinstance(cfg["epochs"], int)
    with pytest.raises(ConfigError, match="'epochs' must be an integer"):
        load_config(None, ["epochs=2.5"])
    with pytest.raises(ConfigError, match="'batch_size' must be a number"):
        load_config(None, ["batch_size=lots"])
