"""A counters shard refuses a recovery state whose counters are split or placed otherwise:
its entities would be counted again from zero in other shards."""

from __future__ import annotations

import pytest

from flows import features_ops as fo
from flows.build import feature_spec
from flows.config import Config


@pytest.mark.parametrize("resume", [
    {"shards": 8, "placement": fo.PLACEMENT},  # another shard count
    {"shards": 16},  # placed by a hash of the whole (entity, id), before PLACEMENT 2
])
def test_counters_refuse_a_state_split_or_placed_otherwise(tmp_path, resume):
    cfg = Config().replace(data_dir=str(tmp_path), features={"shards": 16})
    spec = feature_spec(cfg)
    with pytest.raises(ValueError, match="start from a new recovery store"):
        fo.CountersLogic(cfg, spec, 4, fo.ProcessCounters(cfg, spec), resume)
