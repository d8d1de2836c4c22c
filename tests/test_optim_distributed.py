"""Data-parallel AdaComp on 8 host devices (shard_map), sklearn digits."""

import jax
import numpy as np

from experiments import distributed_adacomp as dist


def test_adacomp_data_parallel_trains_digits_and_compresses():
  assert len(jax.devices()) >= 8
  r = dist.train("digits", steps=150, batch=128, lr=0.1, bin_size_fc=50,
                 compress=True, devices=8)
  assert r["accuracy"] > 0.9
  # Fewer than 1 in 10 gradient elements crossed the network.
  assert r["sent_fraction"] < 0.1
  assert r["fc_ratio"] > 10
  # Each device kept its own residual.
  res = np.asarray(r["comp_state"].residual["Dense_0"]["kernel"])
  assert res.shape[0] == 8
  assert not np.array_equal(res[0], res[1])
  # The replicated params are one array on all devices.
  k = r["params"]["Dense_0"]["kernel"]
  shards = [np.asarray(s.data) for s in k.addressable_shards]
  assert all(np.array_equal(shards[0], s) for s in shards[1:])
