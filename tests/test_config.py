import glob
import json
import os

import pytest

from ds_autofreeze.config import (AutoFreezeConfig, ConfigError, ScheduleConfig, SNRConfig, StaticConfig,
                                  get_autofreeze_config)

from conftest import ROOT


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.json"), recursive=True)))
def test_config_every_shipped_file_validates(path):
    with open(path) as f:
        config = json.load(f)
    af = get_autofreeze_config(config)
    assert af.enabled == ("autofreeze" in config)
    assert "optimizer" in config and config["optimizer"]["type"] == "AdamW"
    if "bf16" not in config:  # CPU configs: no JIT-built optimizer
        assert config["optimizer"]["params"]["torch_adam"] is True


def test_config_absent_section_is_disabled():
    assert get_autofreeze_config({"train_batch_size": 8}).enabled is False


def test_config_default_decider_is_the_measured_one_and_gradnorm_the_papers():
    af = get_autofreeze_config({"autofreeze": {}})
    assert af.enabled and isinstance(af.decider, SNRConfig)
    assert (af.decider.estimator, af.decider.min_trainable, af.decider.trainable_floor(6)) == ("adam", 0.67, 4)
    paper = get_autofreeze_config({"autofreeze": {"decider": {"name": "gradnorm"}}}).decider
    assert (paper.num_intervals, paper.percentile, paper.min_trainable) == (10, 50.0, 1)


def test_config_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"autofreeze\.enabeld: Extra inputs are not permitted"):
        get_autofreeze_config({"autofreeze": {"enabeld": True}})


def test_config_unknown_nested_key_is_named():
    with pytest.raises(ConfigError, match=r"autofreeze\.decider\.gradnorm\.percentil"):
        get_autofreeze_config({"autofreeze": {"decider": {"name": "gradnorm", "percentil": 40}}})


def test_config_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"autofreeze\.decider\.gradnorm\.percentile: .*less than or equal to 100"):
        get_autofreeze_config({"autofreeze": {"decider": {"name": "gradnorm", "percentile": 140}}})


def test_config_unknown_decider_lists_choices():
    with pytest.raises(ConfigError, match=r"autofreeze\.decider: .*'gradnorm', 'snr', 'drift', 'static', 'schedule'"):
        get_autofreeze_config({"autofreeze": {"decider": {"name": "magic"}}})


def test_config_section_must_be_object():
    with pytest.raises(ConfigError, match="autofreeze: must be an object"):
        get_autofreeze_config({"autofreeze": True})


def test_config_static_needs_count():
    with pytest.raises(ConfigError, match=r"autofreeze\.decider\.static\.num_frozen_blocks: Field required"):
        get_autofreeze_config({"autofreeze": {"decider": {"name": "static"}}})
    assert isinstance(get_autofreeze_config({"autofreeze": {"decider": {"name": "static", "num_frozen_blocks": 2}}})
                      .decider, StaticConfig)


def test_config_schedule_must_only_grow():
    with pytest.raises(ConfigError, match="non-decreasing"):
        get_autofreeze_config({"autofreeze": {"decider": {"name": "schedule", "schedule": [
            {"fraction": 0.2, "num_frozen_blocks": 3}, {"fraction": 0.5, "num_frozen_blocks": 1}]}}})
    ok = get_autofreeze_config({"autofreeze": {"decider": {"name": "schedule", "schedule": [
        {"fraction": 0.2, "num_frozen_blocks": 1}, {"fraction": 0.5, "num_frozen_blocks": 3}]}}})
    assert isinstance(ok.decider, ScheduleConfig)


def test_config_adam_reference_needs_the_adam_estimator():
    with pytest.raises(ConfigError, match=r"autofreeze\.decider\.snr: .*adam_reference .* needs estimator 'adam'"):
        get_autofreeze_config({"autofreeze": {"decider": {"name": "snr", "estimator": "moments",
                                                          "adam_reference": "recent"}}})
    ok = get_autofreeze_config({"autofreeze": {"decider": {"name": "snr", "adam_reference": "recent"}}})
    assert ok.decider.adam_reference == "recent"


def test_config_round_trips_through_json():
    af = get_autofreeze_config({"autofreeze": {"total_steps": 100, "decider": {"name": "gradnorm", "num_intervals": 20}}})
    again = AutoFreezeConfig.model_validate(json.loads(json.dumps(af.model_dump(mode="json"))))
    assert again == af


@pytest.mark.parametrize("value, floors", [(4, (4, 4, 4)), (0.67, (4, 8, 16)), (0.5, (3, 6, 12)), (0.01, (1, 1, 1))])
def test_config_min_trainable_is_a_count_or_a_fraction(value, floors):
    decider = get_autofreeze_config({"autofreeze": {"decider": {"name": "snr", "min_trainable": value}}}).decider
    assert tuple(decider.trainable_floor(n) for n in (6, 12, 24)) == floors


@pytest.mark.parametrize("value, message", [(1.5, "neither a count of blocks"), (0, "greater than 0")])
def test_config_min_trainable_bad_value_is_named(value, message):
    with pytest.raises(ConfigError, match=rf"autofreeze\.decider\.snr\.min_trainable: .*{message}"):
        get_autofreeze_config({"autofreeze": {"decider": {"name": "snr", "min_trainable": value}}})
