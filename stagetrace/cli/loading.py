"""Loading a local checkpoint and encoding prompts for ``profile``; every failure is one line."""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from .common import CliError, show

__all__ = ["read_config", "load_model", "encode", "max_positions", "check_prompt_lengths"]


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return show(text if len(text) <= limit else text[: limit - 3] + "...")


def read_config(path: Path, args: argparse.Namespace) -> bytes:
    """config.json's bytes (for the run fingerprint), checked before any model code is loaded."""
    if not path.is_dir():
        raise CliError(f"model path {show(path)} does not exist or is not a directory")
    cfg_file = path / "config.json"
    try:
        raw = cfg_file.read_bytes()
        cfg = json.loads(raw.decode("utf-8-sig"))
    except OSError:
        raise CliError(f"model path {show(path)} has no readable config.json: is it a transformers checkpoint?") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CliError(f"{show(cfg_file)} is not valid JSON: {_first_line(exc)}") from None
    if not isinstance(cfg, dict):
        raise CliError(f"{show(cfg_file)} holds a JSON {type(cfg).__name__}, not the object of a model config")
    if cfg.get("auto_map") and not args.trust_remote_code:
        raise CliError(f"{show(path)} ships its own model code (auto_map in config.json); pass --trust-remote-code "
                       "to run it")
    return raw


def load_model(path: Path, args: argparse.Namespace, device: str) -> tuple[Any, Any, str]:
    """The model, its processor, and the device its inputs go to (the input embeddings')."""
    import torch
    import transformers

    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    common: dict[str, Any] = dict(local_files_only=True, trust_remote_code=args.trust_remote_code)
    if args.device_map:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise CliError("--device-map needs accelerate (pip install 'stagetrace[multi-gpu]')") from None
        common["device_map"] = args.device_map
    # stderr carries our own progress bar and one-line errors only
    transformers.utils.logging.disable_progress_bar()
    model, errors = None, []
    # the loaders' warnings are said only when a model loads: a refusal stays one line
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("default")
        for cls_name in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
            cls = getattr(transformers, cls_name, None)
            if cls is None:
                continue
            try:
                model = cls.from_pretrained(path, dtype=dtype, **common)
                break
            # Whatever a checkpoint makes from_pretrained raise (no weights: OSError; weights that
            # weights_only refuses: UnpicklingError; an unknown model type: ValueError) is a bad input.
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{cls_name}: {_first_line(exc)}")
    if model is None:
        telling = [e for e in errors if "Unrecognized configuration class" not in e] or errors
        raise CliError(f"cannot load a generating model from {show(path)}: {'; '.join(telling)}")
    for w in said:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    processor = _load_processor(path, common)
    if args.device_map:  # placed by the map; inputs go where the embeddings are
        emb = model.get_input_embeddings()
        return model.eval(), processor, str(next(emb.parameters()).device)
    return model.to(device).eval(), processor, device


def _load_processor(path: Path, common: dict[str, Any]) -> Any:
    import transformers

    common = {k: v for k, v in common.items() if k != "device_map"}
    try:
        return transformers.AutoProcessor.from_pretrained(path, **common)
    except Exception:  # noqa: BLE001 - a checkpoint without a processor: its tokenizer is enough for text
        try:
            return transformers.AutoTokenizer.from_pretrained(path, **common)
        except Exception as exc:  # noqa: BLE001 - any failure here is the checkpoint's, said in one line
            raise CliError(f"cannot load a processor or tokenizer from {show(path)}: {_first_line(exc)}") from None


def _texts(processor: Any, prompts: list[str], with_images: bool) -> list[str]:
    tok = getattr(processor, "tokenizer", processor)
    if not with_images:
        if getattr(tok, "chat_template", None):
            return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=False) for p in prompts]
        return prompts
    if getattr(processor, "chat_template", None):
        return [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
            add_generation_prompt=True, tokenize=False) for p in prompts]
    token = getattr(processor, "image_token", None) or "<image>"
    return [f"{token}\n{p}" for p in prompts]


def encode(processor: Any, prompts: list[str], images: list[Any] | None, device: str) -> dict[str, Any]:
    tok = getattr(processor, "tokenizer", processor)
    if getattr(tok, "padding_side", "left") != "left":
        tok.padding_side = "left"  # decoder-only batches pad on the left
    texts = _texts(processor, prompts, images is not None)
    if images is None:
        enc = tok(texts, return_tensors="pt", padding=True)
    else:
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in enc.items()}


def max_positions(model: Any) -> int | None:
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(text, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_prompt_lengths(processor: Any, model: Any, prompts: list[str], max_new_tokens: int,
                         with_images: bool) -> None:
    """Refuses up front a prompt that cannot fit the model's positions with the new tokens.

    With images this counts the text only; a batch whose image tokens overflow is skipped when encoded.
    """
    limit = max_positions(model)
    if limit is None:
        return
    tok = getattr(processor, "tokenizer", processor)
    for i, text in enumerate(_texts(processor, prompts, with_images)):
        n = len(tok(text)["input_ids"])
        if n + max_new_tokens > limit:
            raise CliError(f"prompt {i + 1} is {n} tokens; with --max-new-tokens {max_new_tokens} that exceeds "
                           f"the model's {limit} positions: shorten it or lower --max-new-tokens")
