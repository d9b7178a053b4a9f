"""BitConfig: transformers' defaults, validation and serialisation; the BiT variant table."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from bigtransfer import BitConfig, BitForImageClassification, BitModel
from bigtransfer.config import VARIANTS

TRANSFORMERS_FIELDS = [
    "num_channels", "embedding_size", "hidden_sizes", "depths", "layer_type", "hidden_act", "global_padding",
    "num_groups", "drop_path_rate", "embedding_dynamic_padding", "output_stride", "width_factor",
    "out_features", "out_indices", "stage_names", "num_labels", "id2label", "label2id", "problem_type",
]


def test_defaults_equal_transformers():
    ours, theirs = BitConfig(), transformers.BitConfig()
    for field in TRANSFORMERS_FIELDS:
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.model_type == theirs.model_type == "bit"


@pytest.mark.parametrize("padding, stored", [("same", "SAME"), ("Valid", "VALID"), ("SAME", "SAME"), (None, None)])
def test_global_padding_is_stored_upper_case(padding, stored):
    assert BitConfig(global_padding=padding).global_padding == stored


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(layer_type="basic"),
        dict(global_padding="reflect"),
        dict(depths=[3, -1, 2, 1]),
        dict(depths=[]),
        dict(hidden_sizes=[8, 16], depths=[1, 1, 1]),
        dict(num_groups=0),
        dict(hidden_act="mish-ish"),
        dict(drop_path_rate=1.5),
        dict(output_stride=12),
        dict(width_factor=0),
        dict(num_groups=7),  # 7 does not divide 256 / 64
        dict(problem_type="ranking"),
        dict(num_labels=-1),
    ],
)
def test_invalid_values_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        BitConfig(**kwargs)


def test_layer_type_message_matches_transformers():
    with pytest.raises(ValueError, match="layer_type=basic is not one of preactivation,bottleneck"):
        BitConfig(layer_type="basic")


@pytest.mark.parametrize(
    "out_features, out_indices, expected_features, expected_indices",
    [
        (None, None, ["stage4"], [4]),
        (["stage1", "stage3"], None, ["stage1", "stage3"], [1, 3]),
        (None, [0, 2], ["stem", "stage2"], [0, 2]),
        (None, [-2, -1], ["stage3", "stage4"], [-2, -1]),
        (["stem", "stage4"], [0, 4], ["stem", "stage4"], [0, 4]),
    ],
)
def test_out_features_and_indices_align_like_transformers(out_features, out_indices, expected_features, expected_indices):
    ours = BitConfig(out_features=out_features, out_indices=out_indices)
    theirs = transformers.BitConfig(out_features=out_features, out_indices=out_indices)
    assert (ours.out_features, ours.out_indices) == (expected_features, expected_indices)
    assert (ours.out_features, ours.out_indices) == (theirs.out_features, theirs.out_indices)


@pytest.mark.parametrize(
    "out_features, out_indices",
    [
        ("stage1", None),  # not a list
        (["stage9"], None),  # unknown
        (["stage1", "stage1"], None),  # duplicates
        (["stage3", "stage1"], None),  # out of order
        (None, [7]),  # out of range
        (None, [3, 1]),  # out of order
        (None, [1, -4]),  # duplicate after wrapping
        (["stage1"], [2]),  # disagree
        (["stage1", "stage2"], [1]),  # different lengths
    ],
)
def test_bad_out_features_raise_like_transformers(out_features, out_indices):
    with pytest.raises(ValueError) as ours:
        BitConfig(out_features=out_features, out_indices=out_indices)
    with pytest.raises(Exception) as theirs:
        transformers.BitConfig(out_features=out_features, out_indices=out_indices)
    if type(theirs.value) is ValueError:  # transformers' strict dataclass rejects a non-list with its own type
        assert str(ours.value) == str(theirs.value)


def test_out_features_setter_updates_indices():
    config = BitConfig()
    config.out_features = ["stage2"]
    assert config.out_indices == [2]
    config.out_indices = [1, 4]
    assert config.out_features == ["stage1", "stage4"]


def test_to_dict_writes_both_out_fields_and_labels():
    config = BitConfig(num_labels=3, out_indices=[1, 2])
    data = config.to_dict()
    assert data["out_features"] == ["stage1", "stage2"] and data["out_indices"] == [1, 2]
    assert data["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert data["model_type"] == "bit"
    assert json.loads(config.to_json_string()) == data


def test_save_and_load_round_trip_keeps_unknown_keys(tmp_path):
    config = BitConfig(num_labels=4, conv_layer="std_conv", layer_type="bottleneck", global_padding="same")
    config.save_pretrained(tmp_path)
    loaded = BitConfig.from_pretrained(tmp_path)
    assert loaded == config
    assert loaded.extra["conv_layer"] == "std_conv"
    assert BitConfig.from_pretrained(tmp_path / "config.json", num_labels=7).num_labels == 7


def test_transformers_config_json_loads_and_ours_loads_in_transformers(tmp_path):
    theirs = transformers.BitConfig(num_labels=5, out_features=["stage1", "stage2"], global_padding="same")
    theirs.save_pretrained(tmp_path / "theirs")
    ours = BitConfig.from_pretrained(tmp_path / "theirs")
    for field in TRANSFORMERS_FIELDS:
        assert getattr(ours, field) == getattr(theirs, field), field
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.BitConfig.from_pretrained(tmp_path / "ours")
    for field in TRANSFORMERS_FIELDS:
        assert getattr(back, field) == getattr(ours, field), field


def test_labels_follow_id2label():
    config = BitConfig(id2label={0: "cat", 1: "dog"})
    assert config.num_labels == 2 and config.label2id == {"cat": 0, "dog": 1}
    config.num_labels = 3
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}


def test_missing_path_raises_os_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(OSError, match="nowhere"):
        BitConfig.from_pretrained(missing)


def test_config_that_is_not_json_raises_value_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        BitConfig.from_pretrained(tmp_path)


def test_config_of_another_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="model_type='vit'"):
        BitConfig.from_pretrained(tmp_path)


# Backbone parameter counts of the paper's architectures (millions), as listed in DESIGN.md.
PAPER_BACKBONE_PARAMS = {"R50x1": 23.50, "R101x1": 42.49, "R50x3": 211.17, "R152x2": 232.24, "R101x3": 381.79, "R152x4": 928.34}


@pytest.mark.parametrize("upstream", ["BiT-S", "BiT-M"])
@pytest.mark.parametrize("shape", sorted(PAPER_BACKBONE_PARAMS))
def test_variant_parameter_counts_match_the_paper(upstream, shape):
    config = BitConfig.from_variant(f"{upstream}-{shape}")
    with torch.device("meta"):
        backbone = BitModel(config)
        classifier = BitForImageClassification(config)
    assert round(backbone.num_parameters() / 1e6, 2) == PAPER_BACKBONE_PARAMS[shape]
    head = classifier.num_parameters() - backbone.num_parameters()
    classes = 1000 if upstream == "BiT-S" else 21843
    assert head == (config.num_features + 1) * classes


def test_r50x1_with_heads_matches_published_totals():
    with torch.device("meta"):
        bit_s = BitForImageClassification(BitConfig.from_variant("BiT-S-R50x1"))
        bit_m = BitForImageClassification(BitConfig.from_variant("BiT-M-R50x1"))
    assert round(bit_s.num_parameters() / 1e6, 2) == 25.55
    assert round(bit_m.num_parameters() / 1e6, 2) == 68.26


def test_variant_names_are_case_insensitive_and_accept_suffix():
    assert BitConfig.from_variant("bit-m-r101x3").width_factor == 3
    fine_tuned = BitConfig.from_variant("BiT-M-R50x1-ILSVRC2012")
    assert fine_tuned.num_labels == 1000 and fine_tuned.depths == [3, 4, 6, 3]
    assert BitConfig.from_variant("R152x2").depths == [3, 8, 36, 3]
    assert BitConfig.from_variant("tiny", num_labels=5).num_labels == 5
    with pytest.raises(ValueError, match="unknown BiT variant 'R18x1'"):
        BitConfig.from_variant("R18x1")


def test_every_variant_builds():
    for name in VARIANTS:
        with torch.device("meta"):
            BitForImageClassification(BitConfig.from_variant(name))


def test_update_to_json_file_and_extra_keys_as_attributes(tmp_path):
    config = BitConfig(num_labels=3, architectures=["BitForImageClassification"])
    assert config.architectures == ["BitForImageClassification"]  # a config.json key with no field, as transformers
    with pytest.raises(AttributeError, match="no attribute 'num_label'"):
        config.num_label  # noqa: B018 (a typo stays an error)
    config.update({"num_labels": 5, "out_features": ["stage1"]})
    assert config.num_labels == 5 and config.out_indices == [1]
    with pytest.raises(ValueError, match="one entry per stage"):
        config.update({"depths": [1, 2]})
    assert config.depths == [3, 4, 6, 3] and config.num_labels == 5  # a refused update changes nothing
    config.to_json_file(tmp_path / "config.json")
    assert BitConfig.from_pretrained(tmp_path / "config.json") == config
