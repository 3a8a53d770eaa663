"""Models by Hugging Face id (offline unless told) and GPU ranges per worker."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from deploy.cli import _served_name, build_parser
from deploy.local_cluster import ClusterOptions, gpu_ranges, worker_specs
from instance_manager.models import ModelNotAvailable, fetch_model


def test_gpu_ranges_are_consecutive_and_checked() -> None:
    assert gpu_ranges(2, 2) == [(0, 1), (2, 3)]
    assert gpu_ranges(2, 2, (4, 5, 6, 7)) == [(4, 5), (6, 7)]
    assert gpu_ranges(3, 1) == [(0,), (1,), (2,)]
    with pytest.raises(ValueError, match="need 4 GPUs"):
        gpu_ranges(2, 2, (0, 1, 2))


def test_gpu_workers_get_their_range_and_tp_flag(tmp_path: Path) -> None:
    opts = ClusterOptions(model="/m", served_model_name="m", workers=2, device="gpu",
                          tensor_parallel_size=2, gpus=(2, 3, 4, 5), log_dir=tmp_path)
    w0, w1 = worker_specs(opts)
    for spec, visible in ((w0, "2,3"), (w1, "4,5")):
        cmd = spec.command()
        assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
        assert "--enforce-eager" not in cmd
        assert spec.environment({})["CUDA_VISIBLE_DEVICES"] == visible
    cpu = worker_specs(ClusterOptions(model="/m", served_model_name="m", workers=1,
                                      log_dir=tmp_path))[0]
    assert "--tensor-parallel-size" not in cpu.command()
    assert "CUDA_VISIBLE_DEVICES" not in cpu.environment({})


def test_cli_spells_tensor_parallelism_like_vllm() -> None:
    args = build_parser().parse_args(["up", "--device", "gpu", "-tp", "2", "--gpus", "0,1,2,3",
                                      "--download"])
    assert (args.tensor_parallel_size, args.gpus, args.download) == (2, "0,1,2,3", True)
    assert build_parser().parse_args(["up"]).download is False


def test_hf_ids_are_offline_unless_download(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    calls: list[bool] = []

    def fake_snapshot(repo_id: str, revision=None, local_files_only=False):  # noqa: ANN001
        calls.append(local_files_only)
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    with pytest.raises(ModelNotAvailable, match="--download"):
        fetch_model("org/model")
    assert calls == [True]  # looked in the cache only
    assert fetch_model("org/model", download=True) == str(tmp_path / "snapshot")
    assert calls == [True, True, False]
    assert fetch_model(str(tmp_path)) == str(tmp_path)  # a folder passes through
    with pytest.raises(ModelNotAvailable, match="neither"):
        fetch_model("./not-there")


def test_cached_hf_id_is_used_and_named_like_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, revision=None, local_files_only=False: "/hf/snap/abc")
    assert fetch_model("org/model") == "/hf/snap/abc"
    assert _served_name("org/model", "/hf/snap/abc") == "org/model"
    assert _served_name("tiny", "/x/tiny-llama-seed0") == "tiny-llama"
