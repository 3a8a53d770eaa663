"""Which dtype CPU workers run in: float32 without native bf16, the model's own with it."""

from __future__ import annotations

from pathlib import Path

from deploy.local_cluster import ClusterOptions, worker_specs
from instance_manager.worker_process import choose_dtype, cpu_flags

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_cpu_flags_reads_the_flags_line() -> None:
    assert cpu_flags(AVX2_ONLY) == frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
    assert cpu_flags("no flags here\n") == frozenset()


def test_cpu_without_native_bf16_runs_float32() -> None:
    assert choose_dtype("cpu", "auto", cpu_flags(AVX2_ONLY)) == "float32"


def test_cpu_with_native_bf16_keeps_the_model_dtype() -> None:
    assert choose_dtype("cpu", "auto", cpu_flags(SAPPHIRE)) is None
    only_avx512_bf16 = frozenset({"avx2", "avx512_bf16"})
    assert choose_dtype("cpu", "auto", only_avx512_bf16) is None


def test_explicit_dtype_wins_and_gpus_are_left_alone() -> None:
    assert choose_dtype("cpu", "bfloat16", cpu_flags(AVX2_ONLY)) == "bfloat16"
    assert choose_dtype("gpu", "auto", frozenset()) is None
    assert choose_dtype("gpu", "float16", frozenset()) == "float16"


def test_worker_command_carries_the_choice(tmp_path: Path) -> None:
    opts = ClusterOptions(model="m", served_model_name="m", kv_connector="none",
                          log_dir=tmp_path, dtype="float16")
    for spec in worker_specs(opts):
        cmd = spec.command()
        assert cmd[cmd.index("--dtype") + 1] == "float16"
    auto = worker_specs(ClusterOptions(model="m", served_model_name="m", kv_connector="none",
                                       log_dir=tmp_path))
    expected = choose_dtype("cpu", "auto")  # this host's own answer
    for spec in auto:
        assert spec.dtype == expected
        assert ("--dtype" in spec.command()) == (expected is not None)
