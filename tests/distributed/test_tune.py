"""distributed/tune.py: how many trials of a worker group run at once."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from prunekit import PrunekitError
from prunekit.distributed import cluster, tune


def test_worker_groups_that_cannot_fit_a_local_instance_fail_in_one_line(monkeypatch):
    import ray
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    cpu_trials = SimpleNamespace(workers=2, cpus_per_trial=1, gpus_per_trial=0)
    monkeypatch.setattr(cluster, "_started_local", True)
    with pytest.raises(PrunekitError, match=r"^tune: a trial of 2 workers needs 2.01 CPUs at once; the local Ray "
                                            r"instance has 2 \(lower tune.cpus_per_trial"):
        tune._groups_that_fit(cpu_trials)
    assert tune._groups_that_fit(SimpleNamespace(workers=2, cpus_per_trial=0.5, gpus_per_trial=0)) == 1
    # a cluster this process joined may still grow (autoscaling): one group at a time, no error
    monkeypatch.setattr(cluster, "_started_local", False)
    assert tune._groups_that_fit(cpu_trials) == 1
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 8.0})
    assert tune._groups_that_fit(SimpleNamespace(workers=2, cpus_per_trial=1, gpus_per_trial=2)) == 4
