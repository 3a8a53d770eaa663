"""`fulcrum bench` speaks vLLM's bench dialect: flags, result keys, sweep layout, summary."""

from __future__ import annotations

import json

from benchmarks.bench import find_tokenizer, main, summary_text
from tests.test_bench_harness import fake_server  # noqa: F401 - a fixture


def _run(url: str, tmp_path, *extra: str) -> dict:
    rc = main(["--base-url", url, "--dataset", "random", "--num-prompts", "4",
               "--input-len", "16", "--output-len", "3", "--request-rate", "100",
               "--result-dir", str(tmp_path), "--no-progress", "--length-oracle", *extra])
    assert rc == 0
    return json.loads((tmp_path / "run.json").read_text())


def test_generated_texts_metadata_headers_and_warmups(fake_server, tmp_path):  # noqa: F811
    url, bodies = fake_server
    before = len(bodies)
    result = _run(url, tmp_path, "--save-result", "--save-detailed", "--result-filename",
                  "run.json", "--metadata", "gpu=none", "run=7", "--header", "X-Trace=abc",
                  "--num-warmups", "2", "--ignore-eos")
    assert result["generated_texts"] == ["t0t1t2"] * 4
    assert result["gpu"] == "none" and result["run"] == "7"
    sent = bodies[before:]
    assert len(sent) == 2 + 4  # warm-ups are sent, not measured
    assert result["completed"] == 4
    assert all(b["_headers"]["x-trace"] == "abc" and b["ignore_eos"] is True for b in sent)


def test_ramp_keys_are_vllms(fake_server, tmp_path):  # noqa: F811
    url, _ = fake_server
    result = _run(url, tmp_path, "--save-result", "--result-filename", "run.json",
                  "--arrival", "ramp", "--ramp-start-rps", "50", "--ramp-end-rps", "200",
                  "--ramp-strategy", "exponential")
    assert (result["ramp_up_strategy"], result["ramp_up_start_rps"],
            result["ramp_up_end_rps"]) == ("exponential", 50.0, 200.0)
    assert "generated_texts" not in result  # per-request arrays only with --save-detailed


def test_sweep_is_written_in_vllm_sweep_layout(fake_server, tmp_path):  # noqa: F811
    url, _ = fake_server
    rc = main(["--base-url", url, "--dataset", "random", "--num-prompts", "3",
               "--input-len", "8", "--output-len", "3", "--goodput", "ttft:5000",
               "--sweep-rates", "50,100", "--save-result", "--result-dir", str(tmp_path),
               "--result-filename", "sweep.json", "--no-progress", "--length-oracle"])
    assert rc == 0
    folder = tmp_path / "sweep"
    summaries = sorted(folder.rglob("summary.json"))
    assert [p.parent.name for p in summaries] == ["BENCH--request_rate=100",
                                                  "BENCH--request_rate=50"]
    for path in summaries:
        (run,) = json.loads(path.read_text())
        assert run["run_number"] == 0 and run["completed"] == 3
        assert json.loads((path.parent / "run=0.json").read_text()) == run
    # what `vllm bench sweep plot` does to find them
    found = [r for p in folder.rglob("**/summary.json") for r in json.loads(p.read_text())]
    assert sorted(r["request_rate"] for r in found) == [50.0, 100.0]


def test_summary_block_looks_like_vllms():
    result = {"completed": 10, "failed": 0, "duration": 2.5, "request_throughput": 4.0,
              "mean_ttft_ms": 12.0, "median_ttft_ms": 11.0, "p99_ttft_ms": 30.0,
              "mean_e2el_ms": 100.0, "median_e2el_ms": 90.0, "p99_e2el_ms": 200.0,
              "slo_attainment": 0.9}
    text = summary_text(result, ["ttft", "e2el"], [99.0])
    lines = text.splitlines()
    assert lines[0] == "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")
    assert "Successful requests:                     10" in text
    assert "P99 TTFT (ms):                           30.00" in text
    assert "End-to-end Latency" in text and "Inter-token Latency" not in text
    assert lines[-1] == "=" * 50


def test_tokenizer_is_the_served_models_when_found(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    folder.mkdir(parents=True)
    (folder / "tokenizer_config.json").write_text("{}")
    monkeypatch.setenv("FULCRUM_CACHE_DIR", str(tmp_path))
    assert find_tokenizer("SmolLM2-135M-Instruct") == str(folder)
    assert find_tokenizer("whatever", root=str(folder)) == str(folder)
    assert find_tokenizer("no-such/model-anywhere") is None


def test_sharegpt_without_a_tokenizer_says_it_approximates(fake_server, tmp_path,  # noqa: F811
                                                           capsys):
    url, _ = fake_server
    rc = main(["--base-url", url, "--num-prompts", "2", "--request-rate", "100",
               "--output-len-override", "2", "--length-oracle", "--no-progress", "--save-result",
               "--result-dir", str(tmp_path), "--result-filename", "run.json"])
    assert rc == 0
    assert "counting tokens as chars/4" in capsys.readouterr().err
    assert json.loads((tmp_path / "run.json").read_text())["tokenizer_id"] == "approx-chars/4"
