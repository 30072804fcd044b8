"""The Ray executor computes on a local Ray cluster what the sequential executor computes."""

from __future__ import annotations

import pytest

from fedhet.clients.trainer import LocalTrainer, TrainConfig
from fedhet.models import build_model
from fedhet.sim.executor import SequentialExecutor
from tests.test_vectorized import SHAPE, assert_same, data, tasks_for

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'fedhet[ray]'")

from fedhet.sim.ray_executor import RayExecutor  # noqa: E402  (needs ray)


def test_a_local_ray_cluster_computes_the_sequential_results() -> None:
    x, y, shards = data()
    config = TrainConfig(lr=0.05, batch_size=8)
    model = build_model("cnn", SHAPE, 10, seed=0)
    tasks = tasks_for(model, len(shards))
    expected = SequentialExecutor(LocalTrainer(model, config), x, y, shards, seed=5).run(tasks)
    trainer = LocalTrainer(build_model("cnn", SHAPE, 10, seed=0), config)
    with RayExecutor(trainer, x, y, shards, seed=5, workers=2) as executor:
        assert executor.batch_size >= 2
        actual = executor.run(tasks)
        assert executor.counts() == (len(tasks), 0)
    assert not ray.is_initialized()  # the executor started the local cluster, so it shut it down
    assert_same(expected, actual)
