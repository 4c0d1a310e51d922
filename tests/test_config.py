import pytest

from scale_diffrec.config import load_config, parse_override
from scale_diffrec.errors import ConfigError
from scale_diffrec.schema import DEFAULTS


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


# ------------------------------------------------------------------ the schema's rules
@pytest.mark.parametrize("sets, pattern", [
    (["lr=-1"], r"^--set lr=-1: config key 'lr' must be > 0, got -1$"),
    (["lr=nan"], r"'lr' must be a finite number"),
    (["batch_size=-5"], r"'batch_size' must be a positive integer, got -5"),
    (["batch_size=0"], r"'batch_size' must be a positive integer"),
    (["eval_every=0"], r"'eval_every' must be a positive integer"),
    (["epochs=0"], r"'epochs' must be a positive integer"),
    (["patience=0"], r"'patience' must be a positive integer"),
    (["epochs=true"], r"'epochs' must be a number"),
    (["weight_decay=-0.1"], r"'weight_decay' must be >= 0"),
    (["seed=-1"], r"'seed' must be >= 0"),
    (["diffusion.noise_min=0.02", "diffusion.noise_max=0.005"],
     r"'diffusion.noise_min' \(0.02\) must be < 'diffusion.noise_max' \(0.005\)"),
    (["diffusion.noise_min=0"], r"'diffusion.noise_min' must be > 0"),
    (["diffusion.noise_scale=0"], r"'diffusion.noise_scale' must be > 0"),
    (["diffusion.schedule=linear", "diffusion.noise_scale=100"],
     r"'diffusion.noise_scale' gives beta_39 = 1 .* every beta must lie in \(0, 1\)"),
    (["diffusion.noise_scale=100"], r"'diffusion.noise_scale' x noise_max = 1 must be < 1"),
    (["diffusion.schedule=trunc_lin", "diffusion.steps=10"], r"'diffusion.schedule' gives beta_"),
    (["diffusion.steps=1"], r"'diffusion.steps' must be >= 2"),
    (["denoiser.residual=true"], r"config key 'denoiser.residual' is L-DiffRec's .* model "
                                 r"'diffrec'"),
    (["diffusion.sampling_steps=41"],
     r"'diffusion.sampling_steps' \(41\) must not exceed 'diffusion.steps' \(40\)"),
    (["diffusion.uniform_prob=2"], r"'diffusion.uniform_prob' must be <= 1"),
    (["model=foo"], r"'model' must be one of 'diffrec', 'ldiffrec', .* or 'diffurec', got 'foo'"),
    (["diffusion.schedule=quadratic"], r"'diffusion.schedule' must be one of"),
    (["ldiffrec.act=gelu"], r"'ldiffrec.act' must be one of"),
    (["topk=[10, 50]"], r"'select_metric' \(recall@20\) needs K = 20 in 'topk'"),
    (["select_metric=auc@20"], r"'select_metric' must be METRIC@K"),
    (["topk=[]"], r"'topk' must not be empty"),
    (["topk=[0, 20]"], r"'topk\[0\]' must be a positive integer"),
    (["device=gpu"], r"'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (["precision=fp16"], r"'precision' must be one of"),
    (["diffusion.reweight=maybe"], r"'diffusion.reweight' must be true or false"),
    (["distributed.use_gpu=maybe"], r"'distributed.use_gpu' must be true, false or 'auto'"),
    (["model=ldiffrec", "distributed.workers=3"],
     r"'distributed.workers' is 3 but ldiffrec.n_clusters is 2"),
    (["distributed.workers=2"], r"'model' \('diffrec'\) cannot train distributed"),
    (["distributed.zero_stage=4"], r"'distributed.zero_stage' must be <= 3"),
    (["ldiffrec.n_clusters=4", "ldiffrec.in_dims=[3]"],
     r"'ldiffrec.in_dims' \[3\] has a width below n_clusters \(4\)"),
    (["ldiffrec.dropout=1"], r"'ldiffrec.dropout' must be < 1"),
    (["ldiffrec.cluster_capacity=0.5"], r"'ldiffrec.cluster_capacity' must be >= 1"),
    (["denoiser.dims=[]"], r"'denoiser.dims' must not be empty"),
    (["data.source=parquet"], r"'data.path' is required for data.source 'parquet'"),
    (["data.split.valid=0.6", "data.split.test=0.5"],
     r"'data.split.valid' \+ 'data.split.test' must be < 1"),
    (["data.time_weights={w_min: 1}"], r"'data.time_weights.w_max' is missing"),
    (["distributed.deepspeed=3"], r"'distributed.deepspeed' must be a mapping"),
    (["chunk_mib=0"], r"'chunk_mib' must be > 0"),
    (["ldiffrec.logit_chunk=0"], r"'ldiffrec.logit_chunk' must be a positive integer"),
])
def test_every_rule_fails_at_load_naming_the_key(sets, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(None, sets)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, expected", [('"0"', False), ('"false"', False), ("off", False),
                                            ('"1"', True), ("true", True)])
def test_booleans_given_as_strings_mean_what_they_say(tmp_path, text, expected):
    # the reference's type=bool trap: bool("0") and bool("false") are True
    path = tmp_path / "c.yaml"
    path.write_text(f"diffusion:\n  reweight: {text}\n  sampling_noise: {text}\n")
    cfg = load_config(path)
    assert cfg["diffusion"]["reweight"] is expected
    assert cfg["diffusion"]["sampling_noise"] is expected


def test_file_errors_name_the_file_and_override_errors_name_the_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 4\ndiffusion:\n  noise_min: 0.02\n  noise_max: 0.005\n")
    with pytest.raises(ConfigError, match=r"^.*c\.yaml: config key 'diffusion.noise_min'"):
        load_config(path)
    # an override may repair the file (the reference's run.sh swaps the two)
    cfg = load_config(path, ["diffusion.noise_min=0.005", "diffusion.noise_max=0.02"])
    assert cfg["diffusion"]["noise_min"] < cfg["diffusion"]["noise_max"]
    with pytest.raises(ConfigError, match=r"^--set lr=0: config key 'lr'"):
        load_config(path, ["lr=0", "diffusion.noise_max=0.05"])
    # a key the file sets, overridden: the override is at fault, not the file
    with pytest.raises(ConfigError, match=r"^--set epochs=abc: config key 'epochs' must be a "
                                          r"number \(an integer\), got 'abc'$"):
        load_config(path, ["diffusion.noise_min=0.001", "epochs=abc"])
    # the latest setting of the key, also through a mapping above it or a key below it
    with pytest.raises(ConfigError, match=r"^--set epochs=0: "):
        load_config(path, ["epochs=abc", "epochs=0", "diffusion.noise_min=0.001"])
    with pytest.raises(ConfigError, match=r"^--set diffusion=\{noise_min: -1\}: config key "
                                          r"'diffusion.noise_min' must be > 0"):
        load_config(path, ["diffusion={noise_min: -1}"])
    with pytest.raises(ConfigError, match=r"^--set diffusion.noise_max=0.001: config key "
                                          r"'diffusion.noise_min' \(0.02\) must be <"):
        load_config(path, ["diffusion.noise_max=0.001"])
    # an option that sets a key names itself
    with pytest.raises(ConfigError, match=r"^--workers 0: config key 'distributed.workers'"):
        load_config(path, ["diffusion.noise_min=0.001", ("--workers 0", "distributed.workers=0")])


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "{c}", "--set", "epochs=abc", "--out", "{o}"],
     "error: --set epochs=abc: config key 'epochs' must be a number (an integer), got 'abc'"),
    (["train", "--config", "{c}", "--out", "{o}"],
     "error: {c}: config key 'lr' must be > 0, got 0"),
    (["train", "--config", "{c}", "--set", "lr=1e-3", "--set", "diffusion.steps=x",
      "--out", "{o}"], "error: --set diffusion.steps=x: config key 'diffusion.steps' must be a "
                       "number (an integer), got 'x'"),
    (["prepare", "--input", "{c}", "--config", "{p}", "--set", "kcore.users=abc", "--out",
      "{o}"], "error: --set kcore.users=abc: config key 'kcore.users' must be a number "
              "(an integer), got 'abc'"),
    (["prepare", "--input", "{c}", "--config", "{p}", "--out", "{o}"],
     "error: {p}: config key 'split.valid' + 'split.test' must be < 1, got 0.5 + 0.5"),
    (["tune", "--config", "{c}", "--set", "epochs=abc", "--space", "{c}", "--out", "{o}"],
     "error: --set epochs=abc: config key 'epochs' must be a number (an integer), got 'abc'"),
])
def test_cli_config_errors_name_the_override_or_the_file(tmp_path, capsys, argv, message):
    from scale_diffrec.cli import main
    names = {"c": tmp_path / "c.yaml", "p": tmp_path / "p.yaml", "o": tmp_path / "out"}
    names["c"].write_text("epochs: 4\nlr: 0\n")
    names["p"].write_text("split: {valid: 0.5, test: 0.5}\n")
    assert main([a.format(**names) for a in argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message.format(**names)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "p.yaml"]


def test_every_shipped_config_validates():
    from pathlib import Path
    from scale_diffrec.choices import Model
    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 9
    from scale_diffrec.data.prepare_config import load_prepare_config
    for path in configs:            # training configs, and the prepare command's own
        if path.name.endswith("-prepare.yaml"):
            load_prepare_config(path)
        else:
            assert load_config(path)["model"] in Model.values()


def test_choices_are_named_types_equal_to_their_values():
    from scale_diffrec.choices import Model, Schedule
    cfg = load_config(None, ["model=ldiffrec", "diffusion.schedule=cosine"])
    assert cfg["model"] == Model.ldiffrec and type(cfg["model"]) is str   # plain in the dict
    assert {Schedule.linear_var: 1}["linear-var"] == 1 and f"{Schedule.linear_var}" == "linear-var"
    assert DEFAULTS == load_config(None)


@pytest.mark.parametrize("command", ["train", "prepare", "tune"])
def test_invalid_yaml_is_one_line_naming_file_line_and_column(tmp_path, capsys, command):
    from scale_diffrec.cli import main
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: ldiffrec\nlr: [1, 2\nseed: 0\n")
    argv = {"train": ["train", "--config", str(bad), "--out", str(tmp_path / "run")],
            "prepare": ["prepare", "--input", str(tmp_path / "log.csv"), "--config", str(bad),
                        "--out", str(tmp_path / "data")],
            "tune": ["tune", "--config", str(bad), "--space", str(bad),
                     "--out", str(tmp_path / "search")]}[command]
    (tmp_path / "log.csv").write_text("user_id,item_id\n1,2\n")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: not valid YAML at line ")
    assert not any((tmp_path / name).exists() for name in ("run", "data", "search"))


def test_typed_is_the_schema_object_with_choices_as_members():
    from scale_diffrec.choices import (Convention, MeanType, Placement, Precision, ReconTarget,
                                       Schedule, StepSampler)
    from scale_diffrec.config import typed
    from scale_diffrec.schema import Config
    cfg = load_config(None, ["model=ldiffrec", "diffusion.schedule=cosine",
                             "diffusion.mean_type=eps", "diffusion.sampler=uniform",
                             "ldiffrec.recon_target=clean", "distributed.placement=params",
                             "precision=bf16", "convention=users_with_truth", "device=cuda:1",
                             "ldiffrec.in_dims=[40, 8]"])
    c = typed(cfg)
    assert isinstance(c, Config) and typed(c) is c
    assert c.diffusion.schedule is Schedule.cosine and c.diffusion.mean_type is MeanType.eps
    assert c.diffusion.sampler is StepSampler.uniform
    assert c.ldiffrec.recon_target is ReconTarget.clean and c.ldiffrec.in_dims == [40, 8]
    assert c.distributed.placement is Placement.params and c.precision is Precision.bf16
    assert c.convention is Convention.users_with_truth
    assert c.device == "cuda:1"                  # a validated string: cuda:N is open-ended
    assert c.model_dump(mode="json") == cfg      # the same config in both forms
    # a dict edited after loading is validated again: the error names the dotted key
    cfg["diffusion"]["noise_min"] = -1
    with pytest.raises(ConfigError, match=r"^config key 'diffusion.noise_min' must be > 0"):
        typed(cfg)
    cfg["diffusion"]["noise_min"], cfg["device"] = 0.005, "gpu"
    with pytest.raises(ConfigError, match=r"^config key 'device' must be 'auto', 'cpu'"):
        typed(cfg)


# ------------------------------------------------------------- keys the model does not read
@pytest.mark.parametrize("model, sets, unread", [
    ("diffrec", ["ldiffrec.frozen_autoencoder_epochs=3", "multvae.dropout=0.2"],
     ["multvae.dropout = 0.2", "ldiffrec.frozen_autoencoder_epochs = 3"]),
    ("ldiffrec", ["denoiser.dims=[64]", "denoiser.emb_size=16", "ldiffrec.lamda=0.1"],
     ["denoiser.dims = [64]"]),                 # L-DiffRec's MLP is ldiffrec.mlp_dims
    ("als", ["diffusion.steps=5", "als.factors=8"], ["diffusion.steps = 5"]),
    ("diffurec", ["denoiser.dropout=0.1", "diffurec.dropout=0.2"], ["denoiser.dropout = 0.1"]),
    ("mostpop", ["diffusion.steps=40"], []),   # the default value: nothing to say
])
def test_keys_set_where_the_model_does_not_read_are_named(model, sets, unread):
    from scale_diffrec.config import typed
    from scale_diffrec.schema import unread_keys
    source = ["data.source=parquet", "data.path=x.parquet"] if model == "diffurec" else []
    assert unread_keys(typed(load_config(None, [f"model={model}", *source, *sets])))[0] == unread


def test_configs_name_no_key_their_model_ignores_and_saved_runs_stay_quiet(tmp_path):
    from pathlib import Path

    from scale_diffrec.config import save_config, typed
    from scale_diffrec.schema import unread_keys
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        if path.name.endswith("-prepare.yaml"):
            continue
        cfg = load_config(path)
        assert unread_keys(typed(cfg))[0] == [], path.name
        save_config(cfg, tmp_path / "config.yaml")   # a run's config.yaml: every key written
        assert unread_keys(typed(load_config(tmp_path / "config.yaml")))[0] == [], path.name


def test_train_warns_once_about_keys_its_model_ignores(tmp_path, caplog):
    from scale_diffrec.train import train
    cfg = load_config(None, ["model=mostpop", "data.source=synthetic", "epochs=1",
                             "data.synthetic.n_users=40", "data.synthetic.n_items=30",
                             "ldiffrec.frozen_autoencoder_epochs=2"])
    with caplog.at_level("INFO", logger="scale_diffrec"):
        train(cfg, tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if "not read by model" in r.getMessage()]
    assert lines == ["config keys not read by model 'mostpop' (it reads no model section), "
                     "ignored: ldiffrec.frozen_autoencoder_epochs = 2"]
