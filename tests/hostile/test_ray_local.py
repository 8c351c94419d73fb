"""The local Ray that ``--engine ray`` starts without --ray-address: no dashboard, Ray's token authentication left on.

(Ray 2.60's own gRPC servers bind every interface whatever ``ray.init`` is given; docs/security.md says so. What
cliplens controls is checked here, without starting Ray.)
"""

from __future__ import annotations

import pytest

from cliplens.distributed import RayOptions, connect_ray


def test_local_ray_is_started_without_a_dashboard_and_keeps_token_auth(monkeypatch):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    assert connect_ray(RayOptions(num_cpus=1)) is True
    assert seen["include_dashboard"] is False
    assert "dashboard_host" not in seen  # never 0.0.0.0
    env = (seen.get("runtime_env") or {}).get("env_vars", {})
    assert "RAY_AUTH_MODE" not in env  # Ray's default for a local cluster: token authentication on
