"""Bamboo checkpoints in the Hugging Face layout: config.json plus model.safetensors, or shards listed in
model.safetensors.index.json. Loading memory-maps each file and builds the model on the meta device, so the
peak is close to one copy of the weights.

Saving cannot tear. A save has one commit point: the atomic replace of the file that names the weights (the
index, or model.safetensors itself for a one-file checkpoint). Everything it names is written and fsynced
before; new shards get names of their own, so the files an older index names are never overwritten. The
commit file also carries the new config and the digest of the config.json it replaces, because config.json is
replaced after the commit: a loader that finds that older config.json (a save killed between the two renames)
uses the committed config instead. A load therefore sees the old checkpoint or the new one, never a mix.
Leftovers of an interrupted save (unreferenced shards, scratch files) are removed by the next save.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import uuid
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bamboo.errors import CheckpointError, ConfigError, InputError
from bamboo.models.config import BambooConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SCRATCH_PREFIX = ".bamboo-save-"
# model.safetensors, model-00001-of-00002.safetensors (Hugging Face), model-<save id>-00001-of-00002.safetensors
_SHARD_PATTERN = re.compile(r"^model(-[0-9a-f]{8})?(-\d{5}-of-\d{5})?\.safetensors$")
# metadata keys of the commit file (index metadata, or model.safetensors' __metadata__)
_COMMITTED_CONFIG, _REPLACED_CONFIG = "bamboo_config", "bamboo_replaced_config_sha256"
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '2GiB' or an int number of bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", str(size), re.IGNORECASE)
    if not match:
        raise CheckpointError(f"max_shard_size={size!r} is not a size; write it as bytes (int) or like '5GB'")
    number, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(number * base**power)


# -- arguments ----------------------------------------------------------------------------------------------

def resolve_dtype(dtype) -> Optional[torch.dtype]:
    """A floating torch dtype from a dtype or its name ("bfloat16", "float16", "float32"); None or "auto" keep
    the checkpoint's dtype."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in _FLOAT_DTYPES:
            raise InputError(f"dtype={dtype!r} is not a dtype bamboo loads weights in; use one of "
                             f"{sorted(_FLOAT_DTYPES)} or 'auto' (the checkpoint's own dtype)")
        return _FLOAT_DTYPES[name]
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"dtype must be a torch.dtype or a name like 'bfloat16', got {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise InputError(f"dtype={dtype} is not a floating-point dtype: weights load as torch.bfloat16, "
                         "torch.float16 or torch.float32 (quantized int weights are not supported)")
    return dtype


def resolve_device(device) -> torch.device:
    """The device, after checking that it exists here (a missing GPU is not a corrupt checkpoint)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device={device!r} is not a device ({exc}); use 'cpu' or 'cuda'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device={str(device)!r} was asked for, but no CUDA device is visible here "
                             "(torch.cuda.is_available() is False): use device='cpu', or run on a GPU machine with a "
                             "CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device={str(device)!r} does not exist: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif device.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=device)
        except Exception as exc:
            raise InputError(f"device={str(device)!r} is not usable here ({exc}); use 'cpu'") from None
    return device


# -- reading ------------------------------------------------------------------------------------------------

def _header_problem(header) -> Optional[str]:
    """What is wrong with a parsed safetensors header, or None."""
    if not isinstance(header, dict):
        return f"its header is a JSON {type(header).__name__}, not an object"
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                return "its __metadata__ is not an object"
            continue
        if not isinstance(entry, dict):
            return f"the header entry of {name!r} is not an object"
        offsets, shape = entry.get("data_offsets"), entry.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"the header entry of {name!r} has no valid data_offsets (got {offsets!r})"
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            return f"the header entry of {name!r} has no valid shape (got {shape!r})"
        if not isinstance(entry.get("dtype"), str):
            return f"the header entry of {name!r} has no dtype"
    return None


def read_safetensors_file_header(path: Path) -> tuple[dict, dict]:
    """(tensor entries, __metadata__) of a .safetensors file, after checking that the header is well formed and
    that the file holds all the bytes it promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing; re-download or re-save the checkpoint") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {path} ({exc}); check the path and its permissions") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc}); the file is corrupt or truncated: "
                              "re-download or re-save it") from None
    problem = _header_problem(header)
    if problem:
        raise CheckpointError(f"{path} is not a valid safetensors file: {problem}; the file is corrupt: re-download "
                              "or re-save it")
    metadata = header.pop("__metadata__", None) or {}
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + header_len + data_end} bytes but the "
                              f"file has {size}; re-download or re-save it")
    return header, metadata


def read_safetensors_header(path: Path) -> dict:
    """The tensor entries of a .safetensors file's header (see read_safetensors_file_header)."""
    return read_safetensors_file_header(path)[0]


def _shard_path(directory: Path, file, index_path: Path) -> Path:
    """The shard an index entry names, refusing names that leave the checkpoint directory."""
    if not isinstance(file, str) or not file:
        raise CheckpointError(f"{index_path} maps a tensor to {file!r}, which is not a file name; re-save the "
                              "checkpoint")
    normal = os.path.normpath(file)
    if os.path.isabs(file) or normal == ".." or normal.startswith(".." + os.sep) or normal.startswith("../"):
        raise CheckpointError(f"{index_path} names the shard {file!r}, outside the checkpoint directory; bamboo "
                              "only reads shards inside it: fix the index or re-save the checkpoint")
    return directory / normal


def _read_index(index_path: Path) -> dict:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid safetensors index ({exc!r}); re-save the "
                              "checkpoint") from None
    metadata = index.get("metadata")
    return {"weight_map": weight_map, "metadata": metadata if isinstance(metadata, dict) else {}}


def checkpoint_files(directory: Path) -> tuple[dict[str, Path], dict]:
    """Map each tensor name to the file holding it; with the metadata of the commit file (the index, or the
    single file's header metadata)."""
    index_path, single_path = directory / INDEX_NAME, directory / WEIGHTS_NAME
    if index_path.exists():
        index = _read_index(index_path)
        files = {name: _shard_path(directory, file, index_path) for name, file in index["weight_map"].items()}
        missing = sorted({p.name for p in files.values() if not p.exists()})
        if missing:
            raise CheckpointError(f"checkpoint {directory} is missing shard file(s) {missing} listed in {INDEX_NAME}; "
                                  "download the missing shards or re-save the checkpoint")
        return files, index["metadata"]
    if single_path.exists():
        header, metadata = read_safetensors_file_header(single_path)
        return {name: single_path for name in header}, metadata
    raise CheckpointError(f"no weights in {directory}: expected {WEIGHTS_NAME} or {INDEX_NAME}")


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes; "" when it does not exist."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return ""


def _load_config(directory: Path, commit: dict) -> BambooConfig:
    """config.json, unless it is the one the last save replaced after its commit (killed between the renames):
    then the config that save committed. An edited config.json (any other content) is honoured."""
    committed = commit.get(_COMMITTED_CONFIG)
    if isinstance(committed, str) and commit.get(_REPLACED_CONFIG) == _file_digest(directory / CONFIG_NAME):
        try:
            return BambooConfig.from_dict(json.loads(committed))
        except (json.JSONDecodeError, ConfigError) as exc:
            raise CheckpointError(f"cannot load {directory}: the config its last save committed is invalid "
                                  f"({exc}); re-save the checkpoint") from None
    try:
        return BambooConfig.from_json_file(directory / CONFIG_NAME)
    except ConfigError as exc:
        raise CheckpointError(f"cannot load {directory}: {exc}") from None


def load_pretrained(cls, directory, dtype=None, device="cpu"):
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    files, commit = checkpoint_files(directory)
    config = _load_config(directory, commit)
    with torch.device("meta"):
        model = cls(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = config.tie_word_embeddings and "lm_head.weight" in expected
    headers = {path: read_safetensors_header(path) for path in set(files.values())}

    found = set(files)
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(set(expected) - found - optional)
    unexpected = sorted(found - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {directory} does not match {cls.__name__} built from its config.json:\n"
            f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}\n"
            "Check that config.json belongs to these weights and that the class fits them "
            "(BambooForCausalLM has lm_head, BambooForSequenceClassification has score)."
        )
    for name, path in files.items():
        if name not in headers[path]:
            raise CheckpointError(f"{INDEX_NAME} in {directory} maps tensor {name} to {path.name}, which does not "
                                  "hold it: the index and the shards come from different saves; re-download or "
                                  "re-save the checkpoint")
        shape = tuple(headers[path][name]["shape"])
        if shape != expected[name]:
            raise CheckpointError(f"tensor {name} in {path.name} has shape {shape} but the config implies "
                                  f"{expected[name]}; config.json and the weights disagree")

    state = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as reader:
                tensors = {name: reader.get_tensor(name) for name in names}
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"reading {path} failed ({exc}); the file is corrupt: re-download or re-save "
                                  "it") from None
        for name, tensor in tensors.items():
            state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
        del tensors
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.reset_non_persistent_buffers(device)
    return model.eval()


# -- writing ------------------------------------------------------------------------------------------------

# Called with the name of each step a save completes; tests set it to kill the saving process at every step.
_save_step_hook: Optional[Callable[[str], None]] = None


def _step(name: str) -> None:
    if _save_step_hook is not None:
        _save_step_hook(name)


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, current_bytes = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + nbytes > max_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = tensor
        current_bytes += nbytes
    shards.append(current)
    return shards


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (its renames), to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on Windows; its renames are durable already
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomically(path: Path, text: str, scratch: Path) -> None:
    scratch.write_text(text)
    _fsync(scratch)
    os.replace(scratch, path)
    _fsync(path.parent)


def _committed_files(directory: Path) -> Optional[set[str]]:
    """The weight files the directory's committed checkpoint uses (None: unknown, so delete nothing)."""
    index_path = directory / INDEX_NAME
    if index_path.exists():
        try:
            return {INDEX_NAME, *map(str, _read_index(index_path)["weight_map"].values())}
        except CheckpointError:
            return None
    return {WEIGHTS_NAME}


def _remove_leftovers(directory: Path, keep: set[str]) -> None:
    """Drop scratch files and weight files no commit names (an interrupted or replaced save's)."""
    for path in directory.iterdir():
        if path.name.startswith(SCRATCH_PREFIX):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        elif (_SHARD_PATTERN.match(path.name) or path.name == INDEX_NAME) and path.name not in keep:
            path.unlink()


def save_pretrained(model, directory, max_shard_size: int | str = "5GB") -> None:
    directory = Path(directory)
    max_bytes = parse_size(max_shard_size)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # stored once, as the embedding
    dtypes = {t.dtype for t in state.values()}
    config = model.config.replace(architectures=[type(model).__name__],
                                  torch_dtype=str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else None)
    config_text = config.to_json_string()
    shards = _shards(state, max_bytes)
    save_id = uuid.uuid4().hex[:8]
    new_files: list[Path] = []  # written by this save, removed again if it fails before its commit
    committed = False
    try:
        directory.mkdir(parents=True, exist_ok=True)
        before = _committed_files(directory)
        if before is not None:
            _remove_leftovers(directory, before)
        commit = {_COMMITTED_CONFIG: config_text, _REPLACED_CONFIG: _file_digest(directory / CONFIG_NAME)}
        if len(shards) == 1:
            keep = {WEIGHTS_NAME}
            scratch = directory / f"{SCRATCH_PREFIX}{save_id}-{WEIGHTS_NAME}"
            new_files.append(scratch)
            save_file(shards[0], str(scratch), metadata={"format": "pt", **commit})
            _fsync(scratch)
            _step("weights written")
            os.replace(scratch, directory / WEIGHTS_NAME)  # the commit, unless an index still names older shards
            _fsync(directory)
            committed = not (directory / INDEX_NAME).exists()
            _step("weights replaced")
            if not committed:
                (directory / INDEX_NAME).unlink()  # the commit when sharded weights become one file
                _fsync(directory)
                committed = True
                _step("old index removed")
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                file = f"model-{save_id}-{i:05d}-of-{len(shards):05d}.safetensors"
                new_files.append(directory / file)
                save_file(shard, str(directory / file), metadata={"format": "pt"})
                _fsync(directory / file)
                weight_map.update(dict.fromkeys(shard, file))
                _step(f"shard {i} written")
            keep = {INDEX_NAME, *weight_map.values()}
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total, **commit}, "weight_map": weight_map}
            scratch = directory / f"{SCRATCH_PREFIX}{save_id}-{INDEX_NAME}"
            new_files.append(scratch)
            _write_text_atomically(directory / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True), scratch)
            committed = True
            _step("index replaced")
        _write_text_atomically(directory / CONFIG_NAME, config_text, directory / f"{SCRATCH_PREFIX}{save_id}-config")
        _step("config replaced")
        _remove_leftovers(directory, keep)  # the older save's weights
        _fsync(directory)
        _step("old weights removed")
    except Exception as exc:
        if committed:
            raise CheckpointError(f"saving to {directory} failed after its weights were committed ({exc}); the "
                                  "directory holds the new checkpoint: save again to tidy it") from exc
        for path in new_files:
            path.unlink(missing_ok=True)
        raise CheckpointError(f"saving to {directory} failed ({exc}); the directory was left as it was") from exc
