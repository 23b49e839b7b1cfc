"""Starting points for the two towers: a tokenizer (learnt from the data or a BERT-style model's), pretrained
text weights, pretrained timm backbone weights. Each fails with a clear message when the weights are out of reach."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig

from modeling_medmoe.vision import create_backbone

from .tokenizer import train_wordpiece_tokenizer


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (no network, no cache, or a wrong name)."""


def offline_hint(name: str, error: Exception) -> str:
    return (
        f"Could not load {name!r} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
        "Without network access, pass a local folder (save_pretrained output) or pre-download it into the Hugging "
        "Face cache; or leave the flag out to train from scratch."
    )


def text_tokenizer(args, train_stream, text_column: str, save_dir: Path, is_main_process: bool):
    """The --tokenizer or --text_model's tokenizer, or a WordPiece tokenizer learnt from the first reports of the
    train stream (the learnt vocabulary may differ between runs where pieces tie; --tokenizer reuses one).

    Call it main-process-first: the main process learns and saves the vocabulary, the others read it. A resumed
    run reads the vocabulary its checkpoints were trained with."""
    source = args.tokenizer or args.text_model
    if source:
        try:
            return AutoTokenizer.from_pretrained(source, model_max_length=args.max_length)
        except (OSError, ValueError) as error:
            raise PretrainedWeightsUnavailable(offline_hint(source, error)) from None
    if args.resume_from_checkpoint and (save_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(save_dir)
    if is_main_process:
        rows = train_stream.select_columns([text_column]).take(args.tokenizer_training_rows)
        texts = (row[text_column] for row in rows if isinstance(row[text_column], str))
        tokenizer = train_wordpiece_tokenizer(texts, args.tokenizer_vocab_size, model_max_length=args.max_length)
        tokenizer.save_pretrained(save_dir)
        return tokenizer
    return AutoTokenizer.from_pretrained(save_dir)


def pretrained_text_config(name: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise PretrainedWeightsUnavailable(offline_hint(name, error)) from None


def load_pretrained_text_tower(model, name: str) -> None:
    """Copy a BERT-style encoder's weights into `model.text_tower.encoder` (its config must match)."""
    try:
        pretrained = AutoModel.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise PretrainedWeightsUnavailable(offline_hint(name, error)) from None
    result = model.text_tower.encoder.load_state_dict(pretrained.state_dict(), strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("position_ids")]
    if missing:
        raise ValueError(f"{name!r} does not fit the text tower; missing weights: {missing[:5]}")


def load_pretrained_vision_backbone(model) -> None:
    """Load timm's pretrained weights for the configured backbone into `model.vision_pyramid.backbone`."""
    vision_config = model.config.vision_config
    try:
        pretrained = create_backbone(vision_config, pretrained=True)
    except Exception as error:  # timm raises many kinds (hub, network, missing file) for the same cause
        raise PretrainedWeightsUnavailable(offline_hint(f"timm/{vision_config.backbone}", error)) from None
    model.vision_pyramid.backbone.load_state_dict(pretrained.state_dict())
