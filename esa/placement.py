"""A model split across devices with Hugging Face accelerate: parsing ``--device-map`` / ``--max-memory``, placing a
model built from a config, and finding where each part of a placed model computes.

Protocol (accelerate's, not esa's own): ``from_pretrained(device_map=..., max_memory=...)`` or, for a model already
built, ``infer_auto_device_map`` + ``dispatch_model`` assign every module to a device (a GPU index, ``cpu`` or
``disk``) and hook each module so that its inputs move to its device. Modules offloaded (``cpu``/``disk`` entries
while a GPU computes, or ``disk`` entries on a CPU-only machine) keep their parameters on the ``meta`` device and
have accelerate copy the real weights in for every forward: a forward pass works, gradients with respect to those
weights do not. Hence:

- the inputs go to the device of the input embedding (:func:`input_device`);
- each parameter, score buffer and gradient stays on its own tensor's device;
- gradient metrics are refused on an offloaded model (:func:`refuse_offload`), and in-place perturbation of an
  offloaded weight edits the copy accelerate keeps in CPU memory (:func:`weight_tensors`); disk-offloaded weights
  are re-read from disk at every forward, so they cannot be perturbed in place and are refused.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from esa.errors import EsaError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
OFFLOAD_OK_METRICS = ("magnitude", "act_mag")  # metrics that need no gradient


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """``0=70GiB,1=70GiB,cpu=200GiB`` (items also given one per ``--max-memory``, joined by commas) → accelerate's
    ``max_memory`` dict: GPU index (``N`` or ``cuda:N``), ``cpu``, ``mps`` or ``disk`` → bytes."""
    if not text:
        return None
    from accelerate.utils import convert_file_size_to_int

    out: dict[int | str, int] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        key, sep, size = item.partition("=")
        key, size = key.strip().lower(), size.strip()
        if not sep or not key or not size:
            raise EsaError(f"--max-memory {item!r}: use DEVICE=SIZE, e.g. 0=70GiB or cpu=200GiB")
        if key.startswith("cuda:"):
            key = key.removeprefix("cuda:")
        if key.isdigit():
            device: int | str = int(key)
        elif key in ("cpu", "mps", "disk"):
            device = key
        else:
            raise EsaError(f"--max-memory {item!r}: the device must be a GPU index (0, 1, ...), cpu, mps or disk")
        try:
            out[device] = convert_file_size_to_int(size)
        except ValueError:
            raise EsaError(f"--max-memory {item!r}: {size!r} is not a size; use e.g. 70GiB, 500MB or bytes") from None
        if out[device] <= 0:
            raise EsaError(f"--max-memory {item!r}: the size must be positive")
    return out or None


def _check_device(value, where: str):
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v.isdigit():
            return int(v)
        if v in ("cpu", "disk", "mps", "meta") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v if v != "meta" else _bad(value, where)
        if v == "cuda":
            return "cuda:0"
    return _bad(value, where)


def _bad(value, where: str):
    raise EsaError(f"--device-map {where}: {value!r} is not a device; use a GPU index, cuda:N, cpu, mps or disk")


def parse_device_map(text: str | None) -> str | dict[str, int | str] | None:
    """``auto | balanced | balanced_low_0 | sequential`` as is, or FILE.json read into {module name: device}."""
    if not text:
        return None
    if text in STRATEGIES:
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise EsaError(f"--device-map {text!r}: use auto, balanced, sequential or a JSON file of module → device "
                       "(no such file)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EsaError(f"--device-map {text}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict) or not raw or not all(isinstance(k, str) for k in raw):
        raise EsaError(f"--device-map {text}: the JSON must be an object mapping module names to devices, "
                       'e.g. {"model.embed_tokens": 0, "model.layers.0": 0, "lm_head": "cpu"}')
    return {k: _check_device(v, text) for k, v in raw.items()}


def uses_gpu(device_map, max_memory: dict | None) -> bool:
    """Whether the placement puts any module on a GPU (the dtype and offload rules follow from it)."""
    if isinstance(device_map, dict):
        return any(isinstance(v, int) or str(v).startswith("cuda") for v in device_map.values())
    if max_memory is not None and not any(isinstance(k, int) for k in max_memory):
        return False
    return torch.cuda.is_available()


def offloads(device_map, max_memory: dict | None) -> bool:
    """Whether a device map given as a file offloads (``disk`` anywhere, or ``cpu`` next to a GPU); a strategy
    (auto, ...) is only known once the model is placed: see :func:`is_offloaded`."""
    if not isinstance(device_map, dict):
        return False
    values = set(device_map.values())
    return "disk" in values or ("cpu" in values and uses_gpu(device_map, max_memory))


def is_offloaded(model: torch.nn.Module) -> bool:
    """Whether accelerate moves some weights in on the fly (they sit on the ``meta`` device between forwards)."""
    return any(p.device.type == "meta" for p in model.parameters())


def refuse_offload(model: torch.nn.Module, metric: str) -> None:
    """Gradient metrics need every scored weight resident on a device: refuse them on an offloaded model."""
    if metric not in OFFLOAD_OK_METRICS and is_offloaded(model):
        raise EsaError(f"--metric {metric} needs gradients, which offloaded weights (cpu/disk entries of the device "
                       "map while a GPU computes) cannot have; give the GPUs more --max-memory, use more GPUs, or "
                       "use --metric magnitude or act_mag")


def offload_folder() -> str:
    """A private temporary folder for disk-offloaded weights, removed when the process exits. (Also silences
    accelerate's notice that offloaded weights sit on the meta device: the run's manifest records it.)"""
    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)
    path = tempfile.mkdtemp(prefix="esa-offload-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _hooks(module: torch.nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else the device of its first parameter."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def input_device(model: torch.nn.Module) -> torch.device:
    """The device the token ids must be on: the input embedding's (the first device of a split model)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, torch.nn.Module):
        return module_device(embeddings)
    return module_device(model)


def devices_of(model: torch.nn.Module) -> list[str]:
    """The devices holding the model's weights (``cpu``, ``cuda:0``, ``disk`` ...), in model order."""
    placed = getattr(model, "hf_device_map", None)
    if placed:
        seen = [f"cuda:{d}" if isinstance(d, int) else str(d) for d in placed.values()]
    else:
        seen = [str(p.device) for p in model.parameters()]
    return list(dict.fromkeys(seen))


def weight_tensors(model: torch.nn.Module, *, writable: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter by name, as the tensor that holds its values: the parameter itself, or for a weight that
    accelerate offloads to CPU memory the copy it keeps there (edits to it reach the next forward). A weight
    offloaded to disk is re-read at every forward, so it cannot be edited in place: with ``writable`` it raises,
    without it comes back as a read-only copy."""
    if not is_offloaded(model):
        return dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()  # tied weights appear once, under their first name, as in named_parameters()
    for module_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{local}" if module_name else local
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.device.type != "meta":
                out[name] = p
                continue
            stored = None
            for hook in _hooks(module):
                weights = getattr(hook, "weights_map", None)
                if weights is not None and getattr(hook, "offload", False):
                    try:
                        stored = weights[local]
                    except KeyError:
                        continue
                    break
            if stored is None:
                raise EsaError(f"{name} is offloaded and has no copy in memory; give it room with --max-memory")
            if writable and _on_disk(weights, local):
                raise EsaError(f"{name} is offloaded to disk and cannot be perturbed in place; give the weights room "
                               "in CPU memory (e.g. --max-memory cpu=200GiB)")
            out[name] = stored
    return out


def _on_disk(weights, local: str) -> bool:
    """Whether accelerate's weights map reads ``local`` from its disk index rather than from a state dict."""
    dataset = getattr(weights, "dataset", weights)
    key = f"{getattr(weights, 'prefix', '')}{local}"
    state = dataset if isinstance(dataset, dict) else (getattr(dataset, "state_dict", None) or {})
    return key not in state


def infer_device_map(model: torch.nn.Module, strategy: str, max_memory: dict | None,
                     dtype: torch.dtype | None = None) -> dict[str, int | str]:
    """The device map accelerate makes of a strategy, as ``from_pretrained`` does: every strategy but
    ``sequential`` first balances the memory over the GPUs (``get_balanced_memory``), then
    ``infer_auto_device_map`` fills the devices in model order, whole decoder layers at a time."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    logging.getLogger("accelerate.utils.modeling").setLevel(logging.ERROR)  # "device N is not available" (plan)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    memory = max_memory
    if strategy != "sequential":
        memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                                     low_zero=strategy == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)


def weight_bytes_per_device(model: torch.nn.Module, device_map: dict[str, int | str],
                            dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes of weights each device of ``device_map`` holds (a parameter goes where its longest mapped prefix
    goes), keyed ``cuda:N`` / ``cpu`` / ``disk``."""
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        prefix = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len,
                     default=None)
        if prefix is None:
            raise EsaError(f"--device-map places no module holding {name}; map every module (or \"\")")
        d = device_map[prefix]
        key = f"cuda:{d}" if isinstance(d, int) else str(d)
        size = torch.empty(0, dtype=dtype or p.dtype).element_size()
        out[key] = out.get(key, 0) + p.numel() * size
    return out


def place_model(model: torch.nn.Module, device_map, max_memory: dict | None) -> torch.nn.Module:
    """Split a model already built (from a config, or the embedded one) with accelerate: a strategy is turned into
    a device map by ``infer_auto_device_map`` (``balanced``: within ``get_balanced_memory``), then
    ``dispatch_model`` places and hooks it. Returns the model, placed."""
    from accelerate import dispatch_model

    if isinstance(device_map, str):
        device_map = infer_device_map(model, device_map, max_memory)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model = dispatch_model(model, device_map=device_map, offload_dir=offload_folder())
    model.hf_device_map = device_map
    return model
