"""Connecting to Ray: a local start on a Ray without its dashboard packages."""
from __future__ import annotations

import pytest


def test_a_local_ray_without_dashboard_packages_starts_without_the_dashboard(monkeypatch, capsys):
    """ray.init(include_dashboard=True) refuses on a Ray installed without ray[default] (seen on a GPU image): the
    local start goes on without the dashboard and says so in one line; any other start error still raises."""
    import ray
    from prunekit.distributed import cluster
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if kwargs["include_dashboard"]:
            raise Exception("Cannot include dashboard with missing packages.")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster, "existing_cluster_address", lambda: None)
    monkeypatch.setattr(cluster, "_started_local", False)  # restored afterwards: stop_local stops nothing of ours
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.connect() == "local" and cluster._started_local
    assert [c["include_dashboard"] for c in calls] == [True, False]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "warning" in err[0] and "without the dashboard" in err[0]

    def broken(**kwargs):
        raise RuntimeError("Failed to bind to 127.0.0.1:8265")

    monkeypatch.setattr(ray, "init", broken)
    monkeypatch.setattr(cluster, "_started_local", False)
    with pytest.raises(RuntimeError, match="Failed to bind"):
        cluster.connect()
    assert not cluster._started_local and capsys.readouterr().err == ""
