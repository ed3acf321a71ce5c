"""Save and load training state without pickle.

A state (optimizer, scheduler, RNG, EMA, counters...) is split in two files next to each other:

* ``<prefix>.safetensors`` holds every tensor under a flat key;
* ``<prefix>.json`` holds the rest of the structure, with ``{"$tensor": key}`` where a tensor was.

JSON can only describe str-keyed objects, lists and finite numbers, so the skeleton tags what it
cannot say natively. Every JSON object in the skeleton is such a tagged node:

    {"$dict": {...}}            dict whose keys are all str
    {"$pairs": [[k, v], ...]}   dict with int keys (optimizer state is keyed by param id)
    {"$tuple": [...]}           tuple (AdamW betas, random.getstate())
    {"$float": "0x7ff0..."}     inf / nan, as the IEEE-754 bits so even nan payloads survive
    {"$tensor": key}            torch.Tensor, loaded back on the CPU
    {"$ndarray": key, "dtype": "<u4", "shape": [624]}   numpy array, stored as raw bytes
    {"$subclass": "torchao.optim.subclass_8bit.OptimState8bit", "inner": {...}, "meta": [...]}
                                a tensor subclass from ``SUBCLASSES`` only (8-bit optimizer moments), as its
                                inner tensors and attributes (``__tensor_flatten__``), rebuilt with
                                ``__tensor_unflatten__``; any other subclass is refused, so a file never names
                                code to run
    {"$dtype": "float32"}       a torch.dtype

Finite floats are written with Python's shortest round-tripping repr, so they come back bit-exact.
"""

from __future__ import annotations

import json
import math
import random
import struct
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from simpletuner_dmd.errors import UserError
from simpletuner_dmd.atomic import write_file

# The tensor subclasses a state may hold (module, class): the 8-bit moments of optimizer ao-adamw8bit.
SUBCLASSES = {"torchao.optim.subclass_8bit.OptimState8bit"}

FORMAT = "simpletuner-dmd-state"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- files


def save_state(path_prefix: Path, state: Any) -> None:
    """Write `state` to ``<prefix>.safetensors`` and ``<prefix>.json``, each atomically."""
    path_prefix = Path(path_prefix)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _Encoder(tensors).encode(state, "")
    # The same id goes into both files so a load can tell a matched pair from a mix of two saves
    # (each file is replaced atomically, but not both together).
    state_id = uuid.uuid4().hex
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "state_id": state_id, "state": skeleton}

    tensor_path, json_path = _paths(path_prefix)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    # Tensors first: a crash before the JSON is replaced leaves an id mismatch, which load reports.
    write_file(tensor_path, lambda tmp: save_file(tensors, tmp, metadata={"state_id": state_id}))
    text = json.dumps(document, indent=1, allow_nan=False)
    write_file(json_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Named trained tensors (an adapter's, a head's) into one safetensors file, from whatever device they live on."""
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(path))


def load_weights_into(live: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Copy a ``save_weights`` file into ``live`` by name, each tensor keeping its device and dtype. Every live name
    must be in the file; a missing one is a UserError naming ``what``, raised before anything is copied."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    missing = sorted(set(live) - set(weights))
    if missing:
        raise UserError(f"{path}: the {what} does not match this model: missing {missing[0]} (and "
                        f"{len(missing) - 1} more)")
    with torch.no_grad():
        for name, tensor in live.items():
            tensor.copy_(weights[name].to(tensor.device, tensor.dtype))


def load_state(path_prefix: Path) -> Any:
    """Read back what `save_state` wrote. Tensors come back on the CPU."""
    tensor_path, json_path = _paths(Path(path_prefix))
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise UserError(f"state file {path} is missing; the checkpoint is incomplete")
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both derive from it
        raise UserError(f"state file {json_path} is not valid JSON ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise UserError(f"state file {json_path} is not a {FORMAT} file")
    if document.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"state file {json_path} has format version {document.get('format_version')!r}; "
            f"this version of simpletuner-dmd reads version {FORMAT_VERSION}"
        )

    with safe_open(str(tensor_path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("state_id") != document.get("state_id"):
            raise UserError(f"{tensor_path} and {json_path} come from different saves; the checkpoint is damaged")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return _decode(document["state"], tensors)


def _paths(path_prefix: Path) -> tuple[Path, Path]:
    # Append rather than with_suffix(): a prefix like "optimizer.rank0" must keep its dot part.
    return path_prefix.with_name(path_prefix.name + ".safetensors"), path_prefix.with_name(path_prefix.name + ".json")


# --------------------------------------------------------------------------- encoding


class _Encoder:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.storages: set[int] = set()

    def encode(self, value: Any, path: str) -> Any:
        # bool before int: bool is an int subclass and must stay a bool.
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"$float": _float_bits(value)}
        if isinstance(value, torch.Tensor) and type(value) not in (torch.Tensor, torch.nn.Parameter):
            return self._encode_subclass(value, path)
        if isinstance(value, torch.Tensor):
            return {"$tensor": self._add(path, self._own(value))}
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError(f"state at {path or '<root>'}: numpy arrays of Python objects cannot be saved")
            raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
            key = self._add(path, torch.from_numpy(raw.copy()))
            return {"$ndarray": key, "dtype": value.dtype.str, "shape": list(value.shape)}
        if isinstance(value, dict):
            return self._encode_dict(value, path)
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(item, f"{path}/{i}") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(item, f"{path}/{i}") for i, item in enumerate(value)]
        raise TypeError(f"state at {path or '<root>'}: cannot save a {type(value).__qualname__}")

    def _encode_subclass(self, value: torch.Tensor, path: str) -> dict:
        name = f"{type(value).__module__}.{type(value).__qualname__}"
        if name not in SUBCLASSES or not hasattr(value, "__tensor_flatten__"):
            raise TypeError(f"state at {path or '<root>'}: cannot save a tensor of type {name}")
        attrs, meta = value.__tensor_flatten__()
        inner = {attr: {"$tensor": self._add(f"{path}/{attr}", self._own(getattr(value, attr)))} for attr in attrs}
        return {"$subclass": name, "inner": inner, "meta": self.encode(list(meta), f"{path}/meta"),
                "size": list(value.shape), "stride": list(value.stride())}

    def _encode_dict(self, value: dict, path: str) -> dict:
        for key in value:
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(f"state at {path or '<root>'}: dict key {key!r} is not a str or int")
        if all(isinstance(key, str) for key in value):
            return {"$dict": {key: self.encode(item, f"{path}/{key}") for key, item in value.items()}}
        return {"$pairs": [[key, self.encode(item, f"{path}/{key}")] for key, item in value.items()]}

    def _own(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU, contiguous tensor that shares memory with no other saved tensor.

        safetensors refuses tensors that share storage (or views of a larger storage), so those
        are cloned; tensors that already own their memory are saved without a copy.
        """
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        whole = storage.nbytes() == tensor.numel() * tensor.element_size()
        if not whole or storage.data_ptr() in self.storages:
            tensor = tensor.clone()
            storage = tensor.untyped_storage()
        if tensor.numel():  # empty tensors have no real storage to collide on
            self.storages.add(storage.data_ptr())
        return tensor

    def _add(self, path: str, tensor: torch.Tensor) -> str:
        # Keys follow the path in the structure so the safetensors file is readable on its own;
        # a suffix keeps them unique when an int key and a str key print the same.
        base = path.lstrip("/") or "root"
        key, n = base, 1
        while key in self.tensors:
            key, n = f"{base}#{n}", n + 1
        self.tensors[key] = tensor
        return key


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(item, tensors) for item in node]
    if not isinstance(node, dict):
        return node  # None, bool, int, float, str
    if "$dict" in node:
        return {key: _decode(item, tensors) for key, item in node["$dict"].items()}
    if "$pairs" in node:
        return {key: _decode(item, tensors) for key, item in node["$pairs"]}
    if "$tuple" in node:
        return tuple(_decode(item, tensors) for item in node["$tuple"])
    if "$float" in node:
        return _float_from_bits(node["$float"])
    if "$tensor" in node:
        return tensors[node["$tensor"]]
    if "$dtype" in node:
        dtype = getattr(torch, str(node["$dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise UserError(f"state skeleton names an unknown dtype {node['$dtype']!r}; the file is damaged")
        return dtype
    if "$subclass" in node:
        return _decode_subclass(node, tensors)
    if "$ndarray" in node:
        raw = tensors[node["$ndarray"]].numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(node["dtype"])).reshape(node["shape"]).copy()
    raise UserError(f"state skeleton holds an unknown node {sorted(node)}; the file is damaged or newer")


def _decode_subclass(node: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    import importlib

    name = str(node["$subclass"])
    if name not in SUBCLASSES:
        raise UserError(f"state skeleton holds a tensor of type {name!r}, which this version does not load")
    module, _, cls_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except ImportError:
        raise UserError(f"this checkpoint holds {cls_name} optimizer state: install {module.split('.')[0]} to "
                        "resume it") from None
    inner = {attr: _decode(item, tensors) for attr, item in node["inner"].items()}
    return cls.__tensor_unflatten__(inner, _decode(node["meta"], tensors), torch.Size(node["size"]),
                                    tuple(node["stride"]))


def _float_bits(value: float) -> str:
    return "0x%016x" % struct.unpack("<Q", struct.pack("<d", value))[0]


def _float_from_bits(bits: str) -> float:
    return struct.unpack("<d", struct.pack("<Q", int(bits, 16)))[0]


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every RNG a training step draws from: Python, numpy (global), torch CPU and each CUDA device."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (also after a `save_state`/`load_state` round trip)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        # Resuming with a different number of visible GPUs is legitimate (the run just will not be
        # bit-identical); restore the devices both machines have.
        for index, device_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
