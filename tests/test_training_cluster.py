"""Ray Train across a simulated 2-node cluster (ray.cluster_utils.Cluster), one worker per node."""
from __future__ import annotations

import json

import pytest

from prunekit.config import load_config
from prunekit.stages import training


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster
    ray.shutdown()  # leave the session's single-node Ray; the next fixture user re-creates it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_head": 1}})
    cluster.add_node(num_cpus=1, resources={"node_worker": 1})
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_sft_on_two_nodes(two_node_cluster, tiny_chat_model_dir, chat_data, tmp_path):
    import ray
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    train, val = chat_data
    # 1 CPU per node and 1 CPU per worker: the two workers can only run one per node
    cfg = load_config("sft", None, {"model": str(tiny_chat_model_dir), "train": str(train), "val": str(val),
                                    "output_dir": str(tmp_path / "out"), "storage_path": str(tmp_path / "runs"),
                                    "name": "two-nodes", "max_steps": 2, "batch_size": 2, "max_length": 64,
                                    "eval_max_samples": 8, "eval_interval": 2, "save_interval": 2,
                                    "wandb.mode": "disabled", "parallel.workers": 2, "ray.cpus_per_worker": 1})
    result = training.sft(cfg)
    log = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [0, 1, 2]
    assert (result.output / "model.safetensors").is_file()
