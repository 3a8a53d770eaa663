"""The composition root: the gateway (`router`) with the role controller
(`instance_manager`) plugged in. Every command that serves (`fulcrum up`, `fulcrum gateway`,
the Ray back end) builds its app here; `router.app.create_app` alone is the gateway
without a controller.
"""

from __future__ import annotations

from functools import partial

from core.flips import FlipCoordinator
from instance_manager.controller.base import ControlSnapshot
from instance_manager.controller.loop import Controller
from instance_manager.controller.metrics import ControllerMetrics
from instance_manager.controller.registry import make_control_policy
from instance_manager.metrics_collector import MetricsCollector
from router.app import GatewayApp, GatewayConfig, WorkerSupervisor, create_app
from router.cluster import Cluster
from router.control_port import ControlConfig
from router.request_mix import RequestMix


def make_controller(control: ControlConfig, flips: FlipCoordinator, mix: RequestMix, *,
                    cluster: Cluster) -> Controller:
    """The controller `control` names, acting through `flips`; its scrapes feed
    `cluster`'s engine gauges (bound to a cluster, a `router.control_port.ControllerFactory`)."""
    if control.policy is None:
        raise ValueError("no control policy named")
    policy = make_control_policy(control.policy, **dict(control.knobs))
    collector = MetricsCollector(window_s=control.window_s, slo=control.slo)
    controller = Controller(collector, flips, policy, interval_s=control.interval_s,
                            advisory=control.advisory, drain_timeout_s=control.drain_timeout_s,
                            request_mix=mix.means, prefill_legs=mix.prefill_legs.quantiles)
    controller.on_snapshot = lambda snap: _store_engine_gauges(cluster, snap)
    return controller


def _store_engine_gauges(cluster: Cluster, snapshot: ControlSnapshot) -> None:
    for name, m in snapshot.metrics.items():
        cluster.set_engine_stats(name, kv_cache_usage=m.kv_cache_usage,
                                 num_running=m.num_running, num_waiting=m.num_waiting)


def build_gateway(config: GatewayConfig, cluster: Cluster,
                  supervisor: WorkerSupervisor | None = None) -> GatewayApp:
    """The gateway over `cluster` with the controller `config.control` names (if any) and
    its `fulcrum_controller_*` series."""
    app = create_app(config, cluster, supervisor,
                     controller=partial(make_controller, cluster=cluster))
    app.state.metrics.registry.register(
        ControllerMetrics(lambda: getattr(app.state, "controller", None)))
    return app
