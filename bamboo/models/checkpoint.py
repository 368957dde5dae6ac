"""Bamboo checkpoints in the Hugging Face layout: config.json plus model.safetensors, or shards listed in
model.safetensors.index.json. Loading memory-maps each file and builds the model on the meta device, so the
peak is close to one copy of the weights; saving writes to a scratch directory first, so a failed save leaves
the target as it was."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bamboo.errors import CheckpointError, ConfigError
from bamboo.models.config import BambooConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_PATTERN = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


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


# -- reading ------------------------------------------------------------------------------------------------

def read_safetensors_header(path: Path) -> dict:
    """The header of a .safetensors file, after checking that the file holds all the bytes it promises."""
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
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc}); the file is corrupt or truncated: "
                              "re-download or re-save it") from None
    header.pop("__metadata__", None)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + header_len + data_end} bytes but the "
                              f"file has {size}; re-download or re-save it")
    return header


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Map each tensor name to the file holding it."""
    index_path, single_path = directory / INDEX_NAME, directory / WEIGHTS_NAME
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path} is not a valid safetensors index ({exc!r}); re-save the "
                                  "checkpoint") from None
        missing = sorted({f for f in weight_map.values() if not (directory / f).exists()})
        if missing:
            raise CheckpointError(f"checkpoint {directory} is missing shard file(s) {missing} listed in {INDEX_NAME}; "
                                  "download the missing shards or re-save the checkpoint")
        return {name: directory / file for name, file in weight_map.items()}
    if single_path.exists():
        return {name: single_path for name in read_safetensors_header(single_path)}
    raise CheckpointError(f"no weights in {directory}: expected {WEIGHTS_NAME} or {INDEX_NAME}")


def load_pretrained(cls, directory, dtype: torch.dtype | None = None, device="cpu"):
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    try:
        config = BambooConfig.from_json_file(directory / CONFIG_NAME)
    except ConfigError as exc:
        raise CheckpointError(f"cannot load {directory}: {exc}") from None
    with torch.device("meta"):
        model = cls(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = config.tie_word_embeddings and "lm_head.weight" in expected
    files = checkpoint_files(directory)
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
                for name in names:
                    tensor = reader.get_tensor(name)
                    state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
                    del tensor
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"reading {path} failed ({exc}); the file is corrupt: re-download or re-save "
                                  "it") from None
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.reset_non_persistent_buffers(device)
    return model.eval()


# -- writing ------------------------------------------------------------------------------------------------

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


def save_pretrained(model, directory, max_shard_size: int | str = "5GB") -> None:
    directory = Path(directory)
    max_bytes = parse_size(max_shard_size)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # stored once, as the embedding
    dtypes = {t.dtype for t in state.values()}
    config = model.config.replace(architectures=[type(model).__name__],
                                  torch_dtype=str(dtypes.pop()).replace("torch.", "") if len(dtypes) == 1 else None)
    shards = _shards(state, max_bytes)
    directory.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".bamboo-save-", dir=directory))
    try:
        written = [CONFIG_NAME]
        config.save(scratch / CONFIG_NAME)
        if len(shards) == 1:
            save_file(shards[0], str(scratch / WEIGHTS_NAME), metadata={"format": "pt"})
            written.append(WEIGHTS_NAME)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(scratch / file), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
                written.append(file)
            total = sum(t.numel() * t.element_size() for t in state.values())
            (scratch / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
            written.append(INDEX_NAME)
        # Everything is on disk: replace the old files, then drop stale weights of an earlier save.
        umask = os.umask(0)
        os.umask(umask)
        for name in written:
            os.chmod(scratch / name, 0o666 & ~umask)  # files made inside the private scratch dir are 0600
            os.replace(scratch / name, directory / name)
        for old in directory.iterdir():
            if _SHARD_PATTERN.match(old.name) and old.name not in written:
                old.unlink()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"saving to {directory} failed ({exc}); the directory was left as it was") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
