"""Starting points for the two towers: a tokenizer (learnt from the data or a BERT-style model's), pretrained
text weights, pretrained timm backbone weights. Each fails with a clear message when the weights are out of reach."""

from __future__ import annotations

import re
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


def text_tokenizer(
    source: str | None,
    train_stream,
    text_column: str,
    save_dir: Path,
    is_main_process: bool,
    *,
    resuming: bool = False,
    training_rows: int = 2000,
    vocab_size: int = 2048,
    max_length: int = 128,
):
    """The tokenizer of `source` (a tokenizer or BERT-style model: folder or Hub id), or a WordPiece tokenizer of
    at most `vocab_size` pieces learnt from the first `training_rows` reports of the train stream (the learnt
    vocabulary may differ between runs where pieces tie; passing a `source` reuses one).

    Call it main-process-first: the main process learns and saves the vocabulary in `save_dir`, the others read it.
    A resumed run (`resuming`) reads the vocabulary its checkpoints were trained with."""
    if source:
        try:
            return AutoTokenizer.from_pretrained(source, model_max_length=max_length)
        except (OSError, ValueError) as error:
            raise PretrainedWeightsUnavailable(offline_hint(source, error)) from None
    if resuming and (save_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(save_dir)
    if is_main_process:
        rows = train_stream.select_columns([text_column]).take(training_rows)
        texts = (row[text_column] for row in rows if isinstance(row[text_column], str))
        tokenizer = train_wordpiece_tokenizer(texts, vocab_size, model_max_length=max_length)
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


def load_pretrained_vision_backbone(model, weights_file: str | Path | None = None) -> None:
    """Load pretrained weights for the configured backbone into `model.vision_model.vision_pyramid.backbone`: timm's
    from the Hub, or a local safetensors file (a timm checkpoint of the whole model, e.g. the model.safetensors of a
    timm Hub repo copied into an air-gapped network), read by timm's own local-file mechanism."""
    vision_config = model.config.vision_config
    if weights_file is not None:
        weights_file = Path(weights_file)
        if weights_file.suffix != ".safetensors":
            raise ValueError(
                f"--vision_backbone_weights takes a .safetensors file (nothing is unpickled); got {weights_file}."
            )
        if not weights_file.is_file():
            raise FileNotFoundError(f"No backbone weights file at {weights_file}.")
    try:
        pretrained = create_backbone(vision_config, pretrained=True, pretrained_file=weights_file)
    except Exception as error:  # timm raises many kinds (hub, network, missing file, wrong keys) for one cause
        if weights_file is not None:  # the file was there: it does not fit the configured backbone
            reason = str(error).splitlines()[0][:300]
            raise PretrainedWeightsUnavailable(
                f"{weights_file} does not fit the configured backbone {vision_config.backbone!r} with "
                f"{vision_config.backbone_kwargs or 'its default sizes'} ({type(error).__name__}: {reason}): pass "
                "a checkpoint of the preset's own backbone (swin-tiny's weights fit --preset swin-tiny)."
            ) from None
        raise PretrainedWeightsUnavailable(offline_hint(f"timm/{vision_config.backbone}", error)) from None
    if weights_file is not None:
        check_file_covers_backbone(weights_file, pretrained.state_dict().keys(), vision_config.backbone)
    model.vision_model.vision_pyramid.backbone.load_state_dict(pretrained.state_dict())


def check_file_covers_backbone(weights_file: Path, backbone_keys, backbone: str) -> None:
    """timm loads a features_only backbone non-strictly; a file for another architecture would leave it random.
    Every backbone weight must be in the file (timm's feature wrapper writes "layers.0" as "layers_0")."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as handle:
        in_file = {re.sub(r"_(\d+)", r".\1", key) for key in handle.keys()}
    missing = [key for key in backbone_keys if re.sub(r"_(\d+)", r".\1", key) not in in_file]
    if missing:
        raise PretrainedWeightsUnavailable(
            f"{weights_file} is not a checkpoint of timm's {backbone!r} as configured: it lacks {len(missing)} of "
            f"its weights (e.g. {missing[:3]})."
        )
