"""Load a Hugging Face causal LM and its tokenizer: hub id, local directory, or the embedded tiny model."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from esa.errors import EsaError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
EMBEDDED_MODEL_ID = "esa-tiny"


@dataclass
class LoadedModel:
    """A model ready for evaluation (eval mode, no parameter requires grad) and what identifies it."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    source: str  # "embedded", "local" or "hub"
    revision: str | None
    dtype: torch.dtype
    device: torch.device  # where the token ids go: the input embedding's device (the first of a split model)
    max_positions: int | None
    device_map: str | None = None  # --device-map as given (None: the whole model on ``device``)

    def describe(self) -> dict:
        return {
            "model_id": self.model_id,
            "source": self.source,
            "revision": self.revision,
            "architecture": type(self.model).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "max_positions": self.max_positions,
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
            **(self._placement() if self.device_map else {}),
        }

    def _placement(self) -> dict:
        from esa.placement import devices_of, is_offloaded

        placed = getattr(self.model, "hf_device_map", None) or {}
        return {"device_map": self.device_map, "devices": devices_of(self.model), "offloaded": is_offloaded(self.model),
                "modules_per_device": {str(d): sum(1 for v in placed.values() if v == d)
                                       for d in dict.fromkeys(placed.values())}}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is not there is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EsaError(f"unknown --device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EsaError("--device cuda requested but no CUDA GPU is visible; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EsaError("--device mps requested but MPS is not available; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """``auto``: float32 on CPU/MPS (exact sums, and bf16 matmuls are slow there); on CUDA the checkpoint's own
    dtype when it is bf16/fp16, else bfloat16."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise EsaError(f"unknown --dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    if checkpoint_dtype in (torch.bfloat16, torch.float16):
        return checkpoint_dtype
    return torch.bfloat16


def embedded_model_dir() -> Path:
    from esa.tiny import ASSETS_DIR

    if not (ASSETS_DIR / "config.json").exists():
        raise EsaError(f"the embedded model is missing from {ASSETS_DIR}; rebuild it with `esa tiny train`")
    return ASSETS_DIR


def _locate(model: str | None) -> tuple[str, str]:
    """Return (what to pass to from_pretrained, source)."""
    if model is None or model == EMBEDDED_MODEL_ID:
        return str(embedded_model_dir()), "embedded"
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise EsaError(f"--model {model} is a file; pass the directory that holds config.json")
        if not (path / "config.json").exists():
            raise EsaError(f"--model {model} is not a Hugging Face model directory (no config.json in it)")
        return str(path), "local"
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise EsaError(f"--model {model}: no such directory")
    return model, "hub"


def _checkpoint_dtype(config) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        return DTYPES.get(value)
    return value if isinstance(value, torch.dtype) else None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:240] + ("…" if len(text) > 240 else "")


def _load_config(model: str | None, target: str, source: str, hub_kwargs: dict):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(target, **hub_kwargs)
    except (OSError, ValueError, KeyError) as e:
        where = "the Hugging Face hub is unreachable or the id is wrong" if source == "hub" else "its config.json is unreadable"
        raise EsaError(f"cannot load model {model or target!r} ({where}): {_short(e)}") from None


def _max_positions(config) -> int | None:
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if value else None


def model_context(model: str | None, *, revision: str | None = None, trust_remote_code: bool = False) -> int | None:
    """The model's context length from its config alone (no weights loaded); None when the config has none."""
    target, source = _locate(model)
    return _max_positions(_load_config(model, target, source,
                                       {"revision": revision, "trust_remote_code": trust_remote_code}))


def meta_model(model: str | None, *, dtype: torch.dtype, revision: str | None = None,
               trust_remote_code: bool = False) -> torch.nn.Module:
    """The model built from its config alone on the ``meta`` device: shapes and names, no weights, no memory.

    A local directory holding only ``config.json`` works."""
    from transformers import AutoModelForCausalLM

    target, source = _locate(model)
    config = _load_config(model, target, source, {"revision": revision, "trust_remote_code": trust_remote_code})
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, ImportError) as e:
        raise EsaError(f"cannot build model {model or target!r} from its config: {_short(e)}") from None


def load_model(
    model: str | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device_map: str | None = None,
    max_memory: str | None = None,
) -> LoadedModel:
    """Load ``model`` (hub id, local directory, or None for the embedded tiny model) for evaluation.

    The model is put in eval mode (no dropout) with ``requires_grad`` off everywhere; scoring turns it on for
    the tensors it scores. Failures become one-line :class:`EsaError` messages. With ``device_map`` (auto,
    balanced, sequential or a JSON file; see :mod:`esa.placement`) accelerate splits the model across devices
    within ``max_memory`` (e.g. ``0=70GiB,cpu=200GiB``) instead of putting it on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from esa.placement import offload_folder, parse_device_map, parse_max_memory, uses_gpu

    target, source = _locate(model)
    placement = parse_device_map(device_map)
    memory = parse_max_memory(max_memory)
    if memory is not None and placement is None:
        raise EsaError("--max-memory needs --device-map (e.g. --device-map auto)")
    if placement is not None and device != "auto":
        raise EsaError(f"--device {device} and --device-map are exclusive: the device map places the model")
    if placement is not None:
        dev = torch.device("cuda") if uses_gpu(placement, memory) else torch.device("cpu")
    else:
        dev = resolve_device(device)
    hub_kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    config = _load_config(model, target, source, hub_kwargs)
    torch_dtype = resolve_dtype(dtype, dev, _checkpoint_dtype(config))
    kwargs = dict(hub_kwargs, dtype=torch_dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if placement is not None:
        kwargs.update(device_map=placement, max_memory=memory, offload_folder=offload_folder())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = AutoModelForCausalLM.from_pretrained(target, config=config, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as e:
        if placement is None and isinstance(e, RuntimeError):
            raise
        raise EsaError(f"cannot load model weights of {model or target!r}: {_short(e)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, **hub_kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise EsaError(f"cannot load the tokenizer of {model or target!r}: {_short(e)}") from None
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)

    if placement is None:
        net.to(dev)
    else:
        from esa.placement import input_device

        dev = input_device(net)
    net.eval()
    net.requires_grad_(False)
    max_positions = _max_positions(config)
    return LoadedModel(
        model=net,
        tokenizer=tokenizer,
        model_id=EMBEDDED_MODEL_ID if source == "embedded" else model,
        source=source,
        revision=revision,
        dtype=torch_dtype,
        device=dev,
        max_positions=max_positions,
        device_map=device_map,
    )


def set_attention(model: torch.nn.Module, implementation: str) -> None:
    """Switch attention kernels, e.g. to ``eager`` for metrics that need double backward."""
    if getattr(model.config, "_attn_implementation", None) == implementation:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # older transformers
        model.config._attn_implementation = implementation
