"""Loading a local checkpoint and encoding prompts for ``profile``; every failure is one line."""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from .common import CliError, show

__all__ = ["read_config", "load_processor", "load_model", "encode", "max_positions", "check_prompt_lengths", "DTYPES"]

# --dtype (and a sweep's dtype) -> what from_pretrained takes
DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


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


def load_model(path: Path, args: argparse.Namespace, device: str, dtype_name: str) -> tuple[Any, str]:
    """The model in ``dtype_name`` (a key of :data:`DTYPES`), and the device its inputs go to (the input
    embeddings')."""
    import torch
    import transformers

    dtype = "auto" if dtype_name == "auto" else getattr(torch, DTYPES[dtype_name])
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
    if args.device_map:  # placed by the map; inputs go where the embeddings are
        emb = model.get_input_embeddings()
        return model.eval(), str(next(emb.parameters()).device)
    return model.to(device).eval(), device


def load_processor(path: Path, args: argparse.Namespace, images: bool = False) -> Any:
    """The checkpoint's processor, or its tokenizer where it has no processor. Loaded before the
    model: a sweep's processor settings are checked on it first. With ``images`` a processor that
    does not load is one line (its tokenizer would feed the model the prompts without the images)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    common = dict(local_files_only=True, trust_remote_code=args.trust_remote_code)
    try:
        processor = transformers.AutoProcessor.from_pretrained(path, **common)
    except Exception as exc:  # noqa: BLE001 - a checkpoint without a processor: its tokenizer is enough for text
        if images:  # (e.g. Qwen2-VL's processor needs torchvision for its video processor)
            raise CliError(f"cannot load the processor of {show(path)}, which the images need: "
                           f"{_first_line(exc)}") from None
        try:
            return transformers.AutoTokenizer.from_pretrained(path, **common)
        except Exception as exc:  # noqa: BLE001 - any failure here is the checkpoint's, said in one line
            raise CliError(f"cannot load a processor or tokenizer from {show(path)}: {_first_line(exc)}") from None
    if images and getattr(processor, "image_processor", None) is None:
        # a text checkpoint's AutoProcessor is its tokenizer, which drops images= without a word
        raise CliError(f"the checkpoint {show(path)} has no image processor (its processor is a "
                       f"{type(processor).__name__}), so the images would never reach the model: "
                       "profile it without images")
    return processor


def _texts(processor: Any, prompts: list[str], image_counts: list[int] | None) -> list[str]:
    """Each prompt as the model reads it, with one image placeholder per image of its sample."""
    tok = getattr(processor, "tokenizer", processor)
    if image_counts is None:
        if getattr(tok, "chat_template", None):
            return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=False) for p in prompts]
        return prompts
    if getattr(processor, "chat_template", None):
        return [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}] * k + [{"type": "text", "text": p}]}],
            add_generation_prompt=True, tokenize=False) for p, k in zip(prompts, image_counts)]
    token = getattr(processor, "image_token", None) or "<image>"
    return [f"{token * k}\n{p}" for p, k in zip(prompts, image_counts)]


def encode(processor: Any, prompts: list[str], images: list[list[Any]] | None, device: str,
           processor_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The batch's inputs: ``images`` holds each prompt's images (None: text only);
    ``processor_kwargs`` go to the processor's call (a sweep's call-time settings)."""
    tok = getattr(processor, "tokenizer", processor)
    if getattr(tok, "padding_side", "left") != "left":
        tok.padding_side = "left"  # decoder-only batches pad on the left
    texts = _texts(processor, prompts, None if images is None else [len(i) for i in images])
    if images is None:
        enc = tok(texts, return_tensors="pt", padding=True)
    else:
        # one image each: the flat list every processor takes; several: one list per prompt
        given = [i[0] for i in images] if all(len(i) == 1 for i in images) else images
        enc = processor(text=texts, images=given, return_tensors="pt", padding=True, **(processor_kwargs or {}))
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
    for i, text in enumerate(_texts(processor, prompts, [1] * len(prompts) if with_images else None)):
        n = len(tok(text)["input_ids"])
        if n + max_new_tokens > limit:
            raise CliError(f"prompt {i + 1} is {n} tokens; with --max-new-tokens {max_new_tokens} that exceeds "
                           f"the model's {limit} positions: shorten it or lower --max-new-tokens")
