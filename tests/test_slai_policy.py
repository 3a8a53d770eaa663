"""SLAI's rules without vLLM: deadlines, SPF-with-aging queue, TBT targets, config."""

import pytest

from instance_manager.engine_plugins.slai_policy import (
    BatchTimer,
    KeyedQueue,
    RunningItem,
    SLAIConfig,
    last_schedulable_time,
    running_order_key,
    waiting_key,
)


def test_engine_plugins_package_is_import_light():
    import subprocess
    import sys

    code = ("import sys, instance_manager.engine_plugins.slai_policy; "
            "bad = [m for m in ('vllm', 'torch', 'router', 'fastapi', 'httpx') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_last_schedulable_time_matches_eq8():
    assert last_schedulable_time(10.0, 0.5, 10.0, 0.03) == pytest.approx(10.2)


def test_running_order_critical_then_prefills_then_noncritical():
    cfg_theta, mean = 2.0, 0.05  # LST = prev_end + tbt - 0.1
    now = 100.0
    items = {
        "late": RunningItem(False, prev_batch_end=99.9, tbt_s=0.1),      # LST 99.9: critical
        "later": RunningItem(False, prev_batch_end=99.95, tbt_s=0.1),    # LST 99.95: critical
        "prefill": RunningItem(True, prev_batch_end=None, tbt_s=0.1),
        "relaxed": RunningItem(False, prev_batch_end=99.9, tbt_s=0.5),   # LST 100.3
        "strict": RunningItem(False, prev_batch_end=99.99, tbt_s=0.2),   # LST 100.09
        "fresh": RunningItem(False, prev_batch_end=None, tbt_s=0.5),     # never timed: critical
    }
    order = sorted(items, key=lambda k: running_order_key(items[k], now, cfg_theta, mean))
    assert order == ["fresh", "late", "later", "prefill", "strict", "relaxed"]


def test_larger_theta_makes_decodes_critical_sooner():
    item = RunningItem(False, prev_batch_end=100.0, tbt_s=0.2)
    assert running_order_key(item, 100.1, theta=1.0, mean_batch_s=0.05)[0] == 2
    assert running_order_key(item, 100.1, theta=4.0, mean_batch_s=0.05)[0] == 0


def test_dynamic_theta_by_kv_usage():
    cfg = SLAIConfig(theta=10.0, theta_low=5.0, memory_limit=0.9)
    assert cfg.theta_for(0.5) == 5.0
    assert cfg.theta_for(0.95) == 10.0
    assert SLAIConfig(theta=7.0).theta_for(0.1) == 7.0


class Req:
    def __init__(self, name, tokens, arrival, tbt=0.2):
        self.name, self.tokens, self.arrival, self.tbt = name, tokens, arrival, tbt


def queue(cfg):
    return KeyedQueue(lambda r: waiting_key(r.tokens, r.arrival, r.tbt, cfg))


def test_shortest_prompt_first():
    q = queue(SLAIConfig(aging_tokens_per_s=0.0))
    for name, n, t in (("a", 900, 0.0), ("b", 50, 0.1), ("c", 300, 0.2), ("d", 50, 0.3)):
        q.add_request(Req(name, n, t))
    assert [r.name for r in q] == ["b", "d", "c", "a"]
    assert q.peek_request().name == "b" and len(q) == 4
    assert [q.pop_request().name for _ in range(4)] == ["b", "d", "c", "a"]
    assert not q


def test_aging_bounds_how_long_a_long_prompt_is_overtaken():
    q = queue(SLAIConfig(aging_tokens_per_s=100.0))
    q.add_request(Req("long", 1000, arrival=0.0))
    q.add_request(Req("short-soon", 100, arrival=5.0))   # 100 + 500 < 1000: overtakes
    q.add_request(Req("short-late", 100, arrival=9.5))   # 100 + 950 > 1000: does not
    assert [r.name for r in q] == ["short-soon", "long", "short-late"]


def test_strict_tier_first_option():
    cfg = SLAIConfig(aging_tokens_per_s=0.0, strict_tier_first=True)
    q = queue(cfg)
    q.add_request(Req("short-relaxed", 10, 0.0, tbt=0.5))
    q.add_request(Req("long-strict", 800, 0.0, tbt=0.1))
    assert q.pop_request().name == "long-strict"


def test_queue_remove_and_prepend():
    q = queue(SLAIConfig(aging_tokens_per_s=0.0))
    a, b, c = Req("a", 10, 0), Req("b", 20, 0), Req("c", 30, 0)
    q.prepend_requests([c, b])
    q.add_request(a)
    q.remove_request(b)
    q.remove_requests([Req("stranger", 1, 0)])  # absent requests are ignored, like vLLM's
    assert [r.name for r in q] == ["a", "c"]
    with pytest.raises(IndexError):
        queue(SLAIConfig()).peek_request()


def test_tbt_targets_from_request_extra_args():
    cfg = SLAIConfig(default_tbt_s=0.2)
    assert cfg.tbt_target(None) == 0.2
    assert cfg.tbt_target({"tbt_tier": "strict"}) == 0.1
    assert cfg.tbt_target({"tbt_tier": "relaxed"}) == 0.5
    assert cfg.tbt_target({"tbt_ms": 75}) == pytest.approx(0.075)
    assert cfg.tbt_target({"tbt_ms": "40", "tbt_tier": "relaxed"}) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="unknown tbt_tier"):
        cfg.tbt_target({"tbt_tier": "gold"})
    with pytest.raises(ValueError, match="positive"):
        cfg.tbt_target({"tbt_ms": 0})


def test_config_from_mapping_rejects_typos():
    assert SLAIConfig.from_mapping(None) == SLAIConfig()
    assert SLAIConfig.from_mapping({"theta": 3}).theta == 3
    with pytest.raises(ValueError, match="thetta"):
        SLAIConfig.from_mapping({"thetta": 3})


def test_batch_timer_mean_then_ewma():
    timer = BatchTimer(alpha=0.5, warmup=2)
    timer.add(1.0)
    timer.add(3.0)
    assert timer.mean_s == pytest.approx(2.0)
    timer.add(4.0)
    assert timer.mean_s == pytest.approx(3.0)
