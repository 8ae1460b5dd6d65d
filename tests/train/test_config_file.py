"""Run configs are checked field by field before any training: a value of the wrong type or
out of range is refused with a one-line message naming the key (with its section), through
the TOML loader, through ``kcap train`` and through the Python API alike."""
import json
from pathlib import Path

import pytest

from kcap.cli import main
from kcap.config_file import config_from_dict, load_config
from kcap.models.config import model_config
from kcap.run_config import DataConfig, TrainConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# A run small enough that code which failed to refuse a case would still finish quickly.
BASE_TOP = {"model": '"gpt2-1-1"', "exposures": "1", "window": "64", "batch_size": "4",
            "steps": "1", "eval_sample": "5", "log_every": "1"}
BASE_DATA = {"kind": '"bioS"', "n": "20", "variant": '"simple"'}


def render(top=None, data=None, options=None) -> str:
    """TOML text of the base run with overrides: {key: TOML value text} per section."""
    top = {**BASE_TOP, **(top or {})}
    lines = [f"{k} = {v}" for k, v in top.items()]
    if "data" not in top:
        lines += ["[data]"] + [f"{k} = {v}" for k, v in {**BASE_DATA, **(data or {})}.items()]
    if options is not None and "model_options" not in top:
        lines += ["[model_options]"] + [f"{k} = {v}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


# (section, key, TOML value, what the message must contain)
BAD = [
    # the audit's examples
    ("model_options", "tied", '"false"', "model_options.tied must be a bool (true/false), got str 'false'"),
    ("data", "marker", '"false"', "data.marker must be a bool (true/false), got str 'false'"),
    ("", "compile", '"no"', "compile must be a bool (true/false), got str 'no'"),
    ("", "lr", '"0.1"', "lr must be a number, got str '0.1'"),
    ("", "data", "5", "[data] must be a table, got int 5"),
    ("", "betas", "[0.9]", "betas must be 2 numbers, got [0.9]"),
    ("", "warmup_steps", "-1", "warmup_steps must be >= 0"),
    ("", "weight_decay", "-0.01", "weight_decay must be >= 0"),
    ("", "seed", "-1", "seed must be >= 0"),
    ("", "seed", str(2**63), "seed must be >= 0 and <="),
    ("data", "seed", "-1", "data.seed must be >= 0"),
    ("data", "seed", str(2**63), "data.seed must be >= 0 and <="),
    ("", "eval_sample", "0", "eval_sample must be >= 1"),
    # types
    ("", "exposures", "1.5", "exposures must be an integer, got float 1.5"),
    ("", "exposures", "true", "exposures must be an integer, got bool True"),
    ("", "steps", '"10"', "steps must be an integer or None, got str '10'"),
    ("", "betas", '"0.9, 0.98"', "betas must be 2 numbers"),
    ("", "betas", '[0.9, "0.98"]', "betas must be 2 numbers"),
    ("", "betas", "[0.9, 0.98, 0.999]", "betas must be 2 numbers"),
    ("", "precision", "32", "precision must be a string, got int 32"),
    ("", "model_options", '"tied"', "[model_options] must be a table, got str 'tied'"),
    ("data", "n", '"20"', "data.n must be an integer, got str '20'"),
    ("data", "junk_ratio", "[1]", "data.junk_ratio must be 2 integers, got [1]"),
    ("data", "junk_ratio", "[1.0, 7.0]", "data.junk_ratio must be 2 integers"),
    ("model_options", "rotary_fraction", '"0.5"', "model_options.rotary_fraction must be a number"),
    ("model_options", "n_kv_head", "1.0", "model_options.n_kv_head must be an integer or None"),
    # values
    ("", "lr", "0", "lr must be > 0"),
    ("", "lr", "nan", "lr must be a finite number"),
    ("", "lr", "inf", "lr must be a finite number"),
    ("", "eps", "0", "eps must be > 0"),
    ("", "betas", "[0.9, 1.0]", "betas must both be in [0, 1)"),
    ("", "betas", "[-0.1, 0.9]", "betas must both be in [0, 1)"),
    ("", "min_lr_ratio", "1.5", "min_lr_ratio must be in [0, 1]"),
    ("", "grad_clip", "-1", "grad_clip must be >= 0"),
    ("", "steps", "0", "steps must be >= 1"),
    ("", "window", "1", "window must be >= 2"),
    ("", "precision", '"fp64"', "precision must be one of"),
    ("", "recipe", '"fast"', "recipe must be 'paper'"),
    ("", "device", '"gpu"', "device must be 'auto' or a torch device"),
    ("", "model", '"gpt3-1-1"', "model: unknown model name 'gpt3-1-1'"),
    ("", "model", '"gpt2-0-1"', "model: n_layer must be a positive integer"),
    ("data", "kind", '"bioX"', "data.kind must be one of ('bioS', 'bioD', 'bioR'), got 'bioX'"),
    ("data", "n", "0", "data.n must be >= 1"),
    ("data", "variant", '"multi0"', "data.variant: unknown bioS variant part 'multi0'"),
    ("data", "k", "0", "data.k must be >= 1"),
    ("data", "c", "0", "data.c must be >= 1"),
    ("data", "d", "0", "data.d must be >= 1"),
    ("data", "l", "0", "data.l must be >= 1"),
    ("data", "t", "0", "data.t must be >= 1"),
    ("data", "d", "2501", "data.d must be <= t ** l"),
    ("data", "junk_n", "-1", "data.junk_n must be >= 0"),
    ("data", "junk_n", "160000000", "data.n + data.junk_n must be <= N0"),
    ("data", "junk_ratio", "[0, 7]", "data.junk_ratio[0] (useful) must be >= 1"),
    ("data", "junk_ratio", "[1, -7]", "data.junk_ratio[1] (junk) must be >= 1"),
    ("model_options", "n_kv_head", "3", "model_options: n_kv_head (3) must divide n_head (1)"),
    ("model_options", "rotary_fraction", "1.5", "model_options: rotary_fraction must be in [0, 1]"),
    ("model_options", "attn_impl", '"cuda"', "model_options: attn_impl must be one of"),
    ("model_options", "flash", "true", "model_options: unknown keys ['flash']"),
    ("model_options", "context", "128", "model_options cannot set ['context']"),
]
BAD_IDS = [f"{section or 'top'}.{key}={value}" for section, key, value, _ in BAD]


def case_toml(section, key, value) -> str:
    return render(**{{"": "top", "data": "data", "model_options": "options"}[section]: {key: value}})


def one_line_naming(message: str, expected: str):
    assert "\n" not in message.rstrip("\n"), message
    assert expected in message, message


@pytest.mark.parametrize("section, key, value, expected", BAD, ids=BAD_IDS)
def test_bad_value_is_refused_by_load_config_naming_the_key(tmp_path, section, key, value, expected):
    path = tmp_path / "run.toml"
    path.write_text(case_toml(section, key, value))
    with pytest.raises((ValueError, TypeError)) as info:
        load_config(path)
    one_line_naming(str(info.value), expected)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("section, key, value, expected", BAD, ids=BAD_IDS)
def test_bad_value_makes_kcap_train_exit_2_before_training(tmp_path, capsys, section, key, value,
                                                           expected):
    path, run_dir = tmp_path / "run.toml", tmp_path / "run"
    path.write_text(case_toml(section, key, value))
    assert main(["train", str(path), "--out", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kcap: error: ") and err.count("\n") == 1, err
    one_line_naming(err, expected)
    assert not run_dir.exists()


def test_the_base_run_itself_is_accepted(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(render(options={"tied": "false"}))
    cfg = load_config(path)
    assert cfg.data == DataConfig(kind="bioS", n=20, variant="simple")
    assert cfg.model_options == {"tied": False}


def write_bytes(tmp_path, content: bytes) -> Path:
    path = tmp_path / "run.toml"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: tmp, "is a directory"),
    (lambda tmp: tmp / "missing.toml", "does not exist"),
    (lambda tmp: write_bytes(tmp, b'model = "gpt2-1-1"\n# caf\xe9\n'), "is not UTF-8"),
    (lambda tmp: write_bytes(tmp, b"model = gpt2-1-1\n"), "not valid TOML"),
    (lambda tmp: write_bytes(tmp, b'learning_rate = 0.1\n'), "unknown keys ['learning_rate']"),
    (lambda tmp: write_bytes(tmp, b'[data]\nsize = 10\n'), "unknown [data] keys ['size']"),
], ids=["directory", "missing", "not-utf8", "invalid-toml", "unknown-key", "unknown-data-key"])
def test_unreadable_config_files_are_one_line_errors_naming_the_file(tmp_path, capsys, make,
                                                                     expected):
    path = make(tmp_path)
    with pytest.raises(ValueError) as info:
        load_config(path)
    one_line_naming(str(info.value), expected)
    assert str(path) in str(info.value)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kcap: error: ") and err.count("\n") == 1 and str(path) in err, err


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), TrainConfig)


def test_ints_stand_for_floats_and_lists_for_tuples(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(render(top={"lr": "1", "betas": "[0, 0.5]", "grad_clip": "0",
                                "warmup_steps": "0", "seed": str(2**63 - 1)},
                           data={"junk_n": "5", "junk_ratio": "[1, 3]", "seed": str(2**63 - 1)},
                           options={"rotary_base": "500"}))
    cfg = load_config(path)
    assert cfg.lr == 1.0 and type(cfg.lr) is float
    assert cfg.betas == (0.0, 0.5) and all(type(b) is float for b in cfg.betas)
    assert type(cfg.grad_clip) is float and cfg.warmup_steps == 0 and cfg.seed == 2**63 - 1
    assert cfg.data.junk_ratio == (1, 3) and cfg.data.seed == 2**63 - 1
    assert cfg.model_options == {"rotary_base": 500.0} and type(cfg.model_options["rotary_base"]) is float


def test_a_saved_config_json_round_trips(tmp_path):
    """config.json (written by the trainer from asdict) reads back into the same config."""
    from dataclasses import asdict

    cfg = TrainConfig(model="gpt2-1-1", data=DataConfig(n=20, junk_n=3), betas=(0.8, 0.9),
                      steps=None, eval_sample=None, model_options={"tied": False})
    saved = json.loads(json.dumps(asdict(cfg)))
    assert config_from_dict(saved, "config.json") == cfg


@pytest.mark.parametrize("build, error, expected", [
    (lambda: DataConfig(marker="false"), TypeError, "data.marker must be a bool"),
    (lambda: DataConfig(kind="bioD", marker=True), ValueError, "data.marker"),
    (lambda: DataConfig(kind="bioD", junk_n=10), ValueError, "data.junk_n"),
    (lambda: DataConfig(l=10**12, t=1, d=2), ValueError, "data.d must be <= t ** l"),
    (lambda: TrainConfig(compile="no"), TypeError, "compile must be a bool"),
    (lambda: TrainConfig(data=5), TypeError, "data must be a table of DataConfig fields, got int 5"),
    (lambda: TrainConfig(data={"size": 5}), ValueError, "data: unknown keys ['size']"),
    (lambda: TrainConfig(data={"n": 0}), ValueError, "data.n must be >= 1"),
    (lambda: TrainConfig(model_options=[("tied", True)]), TypeError, "model_options must be a table"),
    (lambda: TrainConfig(model_options={"tied": "false"}), TypeError, "model_options.tied must be a bool"),
    (lambda: TrainConfig(seed=2**64), ValueError, "seed must be >= 0 and <="),
    (lambda: TrainConfig(lr=10**400), ValueError, "lr must be a finite number"),
    (lambda: model_config("gpt2-1-1", 10, tied="false"), TypeError, "tied must be a bool"),
    (lambda: model_config("gpt2-1-1", 10, head_dim=64.0), TypeError, "head_dim must be an integer"),
    (lambda: model_config("gpt2-1-1", 10, top_k=0), ValueError, "top_k must be in"),
    (lambda: model_config("gpt2-1-1", 10, init_std=0), ValueError, "init_std must be > 0"),
])
def test_python_api_gets_the_same_checks(build, error, expected):
    with pytest.raises(error) as info:
        build()
    one_line_naming(str(info.value), expected)


def test_config_copies_what_it_is_given():
    """A config owns its data and model options: changing what was passed in changes nothing."""
    data, options = DataConfig(n=20), {"tied": False}
    cfg = TrainConfig(model="gpt2-1-1", data=data, model_options=options)
    data.n, options["tied"] = 0, "false"
    assert cfg.data.n == 20 and cfg.model_options == {"tied": False}
