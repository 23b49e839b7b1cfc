# Copyright 2026 The MedMoE Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
# the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on
# an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the
# specific language governing permissions and limitations under the License.
"""The text tower: a transformers encoder built from config, giving a report feature and word features."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING


def create_text_encoder(text_config: PreTrainedConfig) -> nn.Module:
    """`AutoModel.from_config` without the pooler MedMoE does not use. Its attention is the one `text_config` asks
    for (transformers' default, SDPA where the encoder supports it; `from_pretrained(..., attn_implementation=...)`
    and `set_attn_implementation` choose another)."""
    encoder_class = MODEL_MAPPING[type(text_config)]
    kwargs = {}
    if "add_pooling_layer" in inspect.signature(encoder_class.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    return AutoModel.from_config(text_config, **kwargs)


def merge_word_pieces(token_features: torch.Tensor, word_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the features of the word pieces of each word.

    Args:
        token_features: [batch, tokens, hidden].
        word_ids: [batch, tokens], the word each token belongs to (0, 1, ...), -1 for special, padding and
            punctuation tokens (`MedMoEProcessor` computes it).

    Returns:
        word_features [batch, words, hidden] and word_mask [batch, words] (True where the word exists).
    """
    batch, _, hidden = token_features.shape
    num_words = max(int(word_ids.max()) + 1, 1)
    is_word_piece = word_ids >= 0
    index = word_ids.clamp_min(0)
    pieces = token_features * is_word_piece.unsqueeze(-1).to(token_features.dtype)
    word_features = token_features.new_zeros(batch, num_words, hidden).scatter_add(
        1, index.unsqueeze(-1).expand(-1, -1, hidden), pieces
    )
    pieces_per_word = torch.zeros(batch, num_words, dtype=torch.long, device=word_ids.device).scatter_add(
        1, index, is_word_piece.long()
    )
    return word_features, pieces_per_word > 0


class TextTower(nn.Module):
    """Encodes reports. The token features are the sum of the last `layers_to_sum` hidden layers (GLoRIA)."""

    def __init__(self, text_config: PreTrainedConfig, layers_to_sum: int):
        super().__init__()
        if not 1 <= layers_to_sum <= text_config.num_hidden_layers + 1:
            raise ValueError(
                f"text_hidden_layers_to_sum={layers_to_sum} must be between 1 and the encoder's "
                f"{text_config.num_hidden_layers} layers + 1 (the embeddings)."
            )
        self.encoder = create_text_encoder(text_config)
        self.layers_to_sum = layers_to_sum

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
    ) -> tuple[torch.Tensor, BaseModelOutput]:
        """[batch, tokens] ids -> (token features [batch, tokens, hidden], the first token being the report feature;
        the encoder's own output, with its hidden states and, when asked for, its attentions)."""
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        if output_attentions is not None:
            kwargs["output_attentions"] = output_attentions
        outputs = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True, **kwargs
        )
        return torch.stack(outputs.hidden_states[-self.layers_to_sum :]).sum(dim=0), outputs
