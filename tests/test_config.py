"""Recipe loading: YAML + `--set` overrides into typed dataclasses; bad input is a one-line error naming the key."""
import glob
import os
import subprocess
import sys

import pytest

from engine.config import Config, ConfigError, config_from_dict, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {"synthetic": {"enabled": True}, "model": {"backbone": "tiny"}}


def _cfg(raw=None, overrides=None):
    merged = {**BASE, **(raw or {})}
    return config_from_dict(merged, overrides)


def test_every_shipped_recipe_loads_and_validates():
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert len(paths) >= 7
    for path in paths:
        cfg = load_config(path)
        assert isinstance(cfg, Config), path


def test_overrides_are_typed_and_reach_nested_sections():
    cfg = _cfg(overrides=["optim.lr=0.05", "head.margin.m2=0.3", "head.type=full", "data.batch_size=64",
                          "metrics.prometheus=false", "eval.bins=[a.bin, b.bin]", "head.logit_cache_mib=0"])
    assert cfg.optim.lr == 0.05 and cfg.head.margin.m2 == 0.3 and cfg.head.type == "full"
    assert cfg.head.logit_cache_mib == 0 and cfg.head.logit_cache_bytes == 0
    assert cfg.data.batch_size == 64 and cfg.metrics.prometheus is False and cfg.eval.bins == ["a.bin", "b.bin"]


def test_an_int_is_accepted_where_a_float_is_expected():
    assert _cfg(overrides=["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("raw, overrides, message", [
    ({"optim": {"lrr": 0.1}}, [], r"^optim\.lrr: unknown key \(allowed here: .*lr.*\)$"),
    ({}, ["model.backbon=r50"], r"^model\.backbon: unknown key"),
    ({"head": {"margin": {"scael": 64}}}, [], r"^head\.margin\.scael: unknown key"),
    ({}, ["optim.lr=fast"], r"^optim\.lr: expected float, got 'fast'$"),
    ({"data": {"batch_size": 12.5}}, [], r"^data\.batch_size: expected int, got 12\.5$"),
    ({"metrics": {"prometheus": "yes"}}, [], r"^metrics\.prometheus: expected bool"),
    ({"model": {"backbone": "r51"}}, [], r"^model\.backbone: unknown backbone 'r51'"),
    ({"head": {"type": "fulll"}}, [], r"^head\.type: 'fulll' is not one of"),
    ({"precision": "fp8"}, [], r"^precision: 'fp8' is not one of fp32, bf16, fp16$"),
    ({"engine": "ddp", "precision": "fp16"}, [], r"^precision: fp16 needs engine: deepspeed"),
    ({"schedule": {"steps": 10, "warmup_steps": 10}}, [], r"^schedule\.warmup_steps: 10 must be < schedule\.steps"),
    ({"optim": "sgd"}, [], r"^optim: expected a mapping"),
    ({}, ["head.logit_cache_mib=-1"], r"^head\.logit_cache_mib: -1 must be an integer >= 0$"),
])
def test_bad_values_raise_one_line_errors_naming_the_key(raw, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        _cfg(raw, overrides)
    assert "\n" not in str(info.value)


def test_missing_shards_without_synthetic_data_is_an_error():
    with pytest.raises(ConfigError, match=r"^data\.shards: "):
        config_from_dict({"model": {"backbone": "tiny"}})


def test_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  backbone: tiny\n  embeding_size: 128\nsynthetic: {enabled: true}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: model\.embeding_size: unknown key"):
        load_config(str(path))


def test_train_cli_prints_one_line_and_exits_2_for_a_typo():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--config",
                           os.path.join(ROOT, "configs", "tiny_synthetic.yaml"), "--set", "optim.momentun=0.9"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "optim.momentun: unknown key" in lines[0], proc.stderr
