from pathlib import Path

import pytest

from glasslab.config import PRESETS, Config, build_config, load_toml, parse_overrides, resolve
from glasslab.errors import GlasslabError


def test_every_preset_resolves():
    for name in PRESETS:
        cfg = resolve(name)
        assert isinstance(cfg, Config)
    assert resolve("smoke").train.steps < resolve("tiny").train.steps < resolve("small").train.steps


def test_set_parses_toml_literals_and_keeps_section_defaults():
    cfg = resolve(None, overrides=["train.lr=7e-3", "model.qk_norm=false", "rl.train.steps=7", "data.source=my.txt"])
    assert cfg.train.lr == 7e-3 and cfg.model.qk_norm is False and cfg.data.source == "my.txt"
    assert cfg.rl.train.steps == 7
    assert cfg.rl.train.lr == Config().rl.train.lr != cfg.train.lr  # the stage's own default, not the pretraining lr


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(GlasslabError, match=r"unknown config key 'train.lrr': did you mean 'train.lr'"):
        resolve("tiny", overrides=["train.lrr=1"])
    with pytest.raises(GlasslabError, match=r"'rl.grpo.bta'.*'rl.grpo.beta'"):
        resolve("tiny", overrides=["rl.grpo.bta=0"])
    # a key that moved into a section names where it lives now
    with pytest.raises(GlasslabError, match=r"'rl.beta': did you mean 'rl.grpo.beta' or 'rl.dpo.beta'\?$"):
        resolve("tiny", overrides=["rl.beta=0"])
    with pytest.raises(GlasslabError, match=r"'rl.dpo_beta': did you mean 'rl.dpo.beta'\?$"):
        resolve("tiny", overrides=["rl.dpo_beta=0.2"])


def test_wrong_type_and_bad_preset_and_malformed_set():
    with pytest.raises(GlasslabError, match="bad value for config key 'train.steps'"):
        resolve("tiny", overrides=["train.steps=many"])
    with pytest.raises(GlasslabError, match="did you mean 'tiny'"):
        resolve("tinny")
    with pytest.raises(GlasslabError, match="KEY=VALUE"):
        parse_overrides(["train.lr"])
    with pytest.raises(GlasslabError, match="divisible"):
        resolve("tiny", overrides=["model.n_head=3"])


def test_toml_round_trip(tmp_path: Path):
    cfg = resolve("smoke", overrides=["model.n_kv_head=1", "envs.arithmetic.max_digits=3"])
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    again = resolve(None, config_file=path)
    assert again == cfg


def test_config_file_errors(tmp_path: Path):
    with pytest.raises(GlasslabError, match="not found"):
        resolve("tiny", config_file=tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(GlasslabError, match="not valid TOML"):
        resolve("tiny", config_file=bad)


def test_set_replaces_a_table_and_files_layer_sections(tmp_path: Path):
    """`--set` puts that value at that key: a table given whole replaces the preset's (it used to be merged into
    it, so `--set 'rl.env={countdown=1}'` kept the preset's arithmetic share)."""
    assert resolve("tiny").rl.env == {"countdown": 1, "arithmetic": 1}
    cfg = resolve("tiny", overrides=["rl.env={countdown=1}", "rl.reward_weights={correct=1}"])
    assert cfg.rl.env == {"countdown": 1} and cfg.rl.reward_weights == {"correct": 1}  # not merged with defaults
    assert resolve("tiny", overrides=["rl.reward_weights.digits=0.5"]).rl.reward_weights == {
        "correct": 1,
        "format": 0.1,
        "digits": 0.5,
    }  # a dotted key changes one entry
    # a file layers: its sections and per-environment option tables merge key by key, its weight tables replace
    layer = tmp_path / "layer.toml"
    layer.write_text(
        "[rl]\nenv = { arithmetic = 1 }\n[rl.env_options.arithmetic]\nmax_digits = 4\n"
        "[envs.arithmetic]\nlevel_weights = { 2 = 3 }\n"
    )
    cfg = resolve("tiny", config_file=layer)
    assert cfg.rl.env == {"arithmetic": 1} and cfg.rl.group_size == 4  # the rest of [rl] is the preset's
    assert cfg.rl.env_options["arithmetic"] == {"min_digits": 3, "max_digits": 4}
    assert cfg.envs["arithmetic"] == {"max_digits": 3, "level_weights": {"2": 3}}


def test_a_setting_of_the_other_rl_algorithm_is_an_error(tmp_path: Path):
    msg = r'^rl.grpo.beta does not apply with rl.algo = "dpo": remove it, or set rl.algo = "grpo"$'
    with pytest.raises(GlasslabError, match=msg):
        resolve("tiny", overrides=["rl.algo=dpo", "rl.grpo.beta=0.2"])
    with pytest.raises(GlasslabError, match=msg):
        resolve("tiny", overrides=['rl.algo="dpo"', "rl.grpo={beta=0.2}"])  # a table given whole
    layer = tmp_path / "dpo.toml"
    layer.write_text('[rl]\nalgo = "dpo"\n[rl.grpo]\nbeta = 0.2\nloss_type = "grpo"\n')
    with pytest.raises(GlasslabError, match=r"^rl.grpo.beta, rl.grpo.loss_type do not apply .*remove them"):
        resolve("tiny", config_file=layer)
    with pytest.raises(GlasslabError, match=r'^rl.dpo.beta does not apply with rl.algo = "grpo"'):
        resolve("tiny", overrides=["rl.dpo.beta=0.5"])
    # each algorithm's own section, and the algorithm given after the stray key, resolve as usual
    assert resolve("tiny", overrides=["rl.grpo.beta=0.2"]).rl.grpo.beta == 0.2
    assert resolve("tiny", config_file=layer, overrides=["rl.algo=grpo"]).rl.grpo.loss_type == "grpo"
    assert resolve("tiny", overrides=["rl.algo=dpo", "rl.dpo.beta=0.5"]).rl.dpo.beta == 0.5


def test_preset_values_of_the_other_rl_algorithm_are_not_the_users(monkeypatch: pytest.MonkeyPatch):
    """A preset tunes GRPO for its recipe; running that recipe with DPO is not a mistake of the user's."""
    from glasslab import config

    tiny = config.preset_dict("tiny")
    monkeypatch.setattr(config, "preset_dict", lambda name: config._merge(tiny, {"rl": {"grpo": {"beta": 0.3}}}))
    cfg = resolve("tiny", overrides=["rl.algo=dpo"])
    assert cfg.rl.algo == "dpo" and cfg.rl.grpo.beta == 0.3
    again = resolve(None, overrides=["rl.algo=dpo"], base=cfg.model_dump())  # `glasslab eval --set` on a run
    assert again == cfg


def test_a_saved_dpo_config_reloads_and_can_be_given_back(tmp_path: Path):
    cfg = resolve("smoke", overrides=["rl.algo=dpo", "rl.dpo.beta=0.3"])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    assert "grpo" not in load_toml(path)["rl"]  # what the run does not use is not in its config
    assert build_config(load_toml(path)) == cfg  # resume, eval, a stage from a parent run
    assert resolve(None, config_file=path) == cfg  # `--config runs/<name>/config.toml`


def test_a_config_saved_with_flat_rl_keys_loads_into_the_sections():
    old = {"rl": {"algo": "dpo", "beta": 0.05, "loss_type": "grpo", "dpo_beta": 0.3, "group_size": 4}}
    cfg = build_config(old)
    assert (cfg.rl.grpo.beta, cfg.rl.grpo.loss_type, cfg.rl.dpo.beta, cfg.rl.group_size) == (0.05, "grpo", 0.3, 4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.n_embd=100", "model.n_head=3"], "model.n_embd (100) must be divisible by model.n_head (3)"),
        (["model.n_head=4", "model.n_kv_head=3"], "model.n_head (4) must be divisible by model.n_kv_head (3)"),
        (["model.n_embd=12", "model.n_head=4"], "model.n_embd (12) / model.n_head (4)"),
        (["sft.tasks=[]"], "sft.tasks ([]) and sft.data (None) are both empty"),
        (["rl.env={arithmetic=0}"], "rl.env ({'arithmetic': 0.0}): a mix of environments"),
    ],
)
def test_cross_field_errors_name_the_fields_and_values_not_the_section(overrides: list[str], message: str):
    with pytest.raises(GlasslabError) as err:
        resolve("tiny", overrides=overrides)
    assert message in str(err.value) and "\n" not in str(err.value) and "'n_layer'" not in str(err.value)


@pytest.mark.parametrize(
    "override",
    ["train.steps=0", "sft.train.batch_size=0", "train.lr=-1", "rl.train.lr=0", "data.val_fraction=1", "seed=-1"]
    + ["model.dropout=1", "eval.temperature=-0.5", "eval.pass_k=[0]", "system.threads=0", "train.keep_last=0"],
)
def test_numbers_out_of_range_are_refused_by_key(override: str):
    key = override.split("=")[0]
    with pytest.raises(GlasslabError, match=f"config key '{key}"):
        resolve("tiny", overrides=[override])
