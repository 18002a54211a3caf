"""Hugging Face model folders in and out: `config.json` plus safetensors weights.

A folder loads with transformers' Auto classes (the task head named in `architectures` when it
loads without missing weights, else AutoModel), in eval mode and without writing anything into
the folder. Example inputs come from the folder's tokenizer (a fixed batch of two sentences) or,
without one, from the config (random token ids within `vocab_size`, or `pixel_values` for vision
configs). A result that is still the input's class (see `rescompile.frontends.hf.rebuild`) is
written back with `save_pretrained`, beside the tokenizer files, staged and renamed into place.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from rescompile.errors import RescompileError
from rescompile.frontends._staging import staging_dir

__all__ = ["is_hf_folder", "is_folder_output", "load_folder", "example_inputs", "save_folder"]

logger = logging.getLogger("rescompile")
SENTENCES = ("rescompile rewrites the residual connections of a network.", "A short sentence.")
# Always written beside the vocabulary files the tokenizer class names (`vocab_files_names`).
_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)


def is_hf_folder(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path) / "config.json").is_file()


def is_folder_output(path: Any) -> bool:
    """`-o DIR`: a path without a suffix, or an existing folder."""
    return isinstance(path, (str, os.PathLike)) and (Path(path).is_dir() or not Path(path).suffix)


def load_folder(folder: str | os.PathLike) -> tuple[Any, dict]:
    """The folder's model in eval mode and its example inputs (keyword arguments)."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        raise RescompileError(f"{folder}: no *.safetensors weights beside config.json")
    import transformers

    with _transformers_quiet():
        config = _quiet(transformers.AutoConfig.from_pretrained, folder, local_files_only=True)
        model = _head_model(transformers, folder, config)
        if model is None:
            model, info = _quiet(
                transformers.AutoModel.from_pretrained,
                folder,
                local_files_only=True,
                use_safetensors=True,
                output_loading_info=True,
            )
            if info.get("missing_keys"):
                missing = sorted(info["missing_keys"])
                logger.warning(
                    "%s: %d weights are not in the folder and were initialized at random (%s)",
                    folder,
                    len(missing),
                    ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else ""),
                )
    model.eval()
    return model, example_inputs(model, _tokenizer(folder))


@contextlib.contextmanager
def _transformers_quiet():
    """transformers' progress bars and multi-line load reports would break the CLI's one-line output."""
    from transformers.utils import logging as hf_logging

    enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if enabled:
            hf_logging.enable_progress_bar()


def _quiet(load, *args, **kwargs):
    """A transformers loader as one RescompileError line."""
    try:
        return load(*args, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RescompileError(f"{args[0]}: cannot load with transformers: {first}") from exc


def _head_model(transformers, folder: Path, config) -> Any:
    """The `architectures` class (a task head), when it loads every weight it has from the folder."""
    name = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        return None
    try:
        model, info = cls.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if info.get("missing_keys") else model


def _tokenizer(folder: Path) -> Any:
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None


def example_inputs(model: Any, tokenizer: Any = None, batch: int = 2, length: int = 8) -> dict:
    """Keyword inputs the model's forward accepts: the tokenized `SENTENCES`, else from the config."""
    import torch

    accepted = set(inspect.signature(model.forward).parameters)
    config = model.config
    if tokenizer is not None and "input_ids" in accepted:
        encoded = tokenizer(list(SENTENCES), padding=True, return_tensors="pt")
        return {k: v for k, v in encoded.items() if k in accepted}
    gen = torch.Generator().manual_seed(0)
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if "pixel_values" in accepted and size and channels:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return {"pixel_values": torch.randn(batch, channels, height, width, generator=gen)}
    vocab = getattr(config, "vocab_size", None)
    if "input_ids" in accepted and vocab:
        inputs = {"input_ids": torch.randint(0, vocab, (batch, length), generator=gen)}
        if "attention_mask" in accepted:
            inputs["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
        return inputs
    raise RescompileError(
        f"cannot make example inputs for a {type(model).__name__} from its config; pass --example-inputs"
    )


def check_output_folder(path: Path) -> None:
    """Refuse to replace a folder that is not a model folder (its files would be lost)."""
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise RescompileError(f"-o {path}: a folder with other files in it; give a new or empty folder")


def save_folder(model: Any, path: str | os.PathLike, source: Path | None = None) -> None:
    """`save_pretrained` plus the source folder's tokenizer files, staged beside `path` and renamed
    into place; a model folder already at `path` is replaced only once the new one is complete."""
    path = Path(path)
    check_output_folder(path)
    with staging_dir(path) as tmpdir:
        staged = tmpdir / "model"
        with _transformers_quiet():
            model.save_pretrained(staged, safe_serialization=True)
        if source is not None:
            for name in _tokenizer_files(source):
                shutil.copy2(source / name, staged / name)
        old = tmpdir / "replaced"
        if path.is_dir() and any(path.iterdir()):
            os.replace(path, old)  # NOTE: a rename cannot replace a non-empty folder
        try:
            os.replace(staged, path)
        except OSError:
            if old.exists():
                os.replace(old, path)
            raise


def _tokenizer_files(source: Path) -> list[str]:
    tokenizer = _tokenizer(source)
    names = set(_TOKENIZER_FILES) | set(getattr(tokenizer, "vocab_files_names", {}).values())
    return sorted(n for n in names if (source / n).is_file())
