"""A small BERT, built from a config (nothing downloaded), with LoRA adapters from ``peft``.

Only the adapters and the classification head are trainable, so only they are federated: the
frozen backbone stays on each client (``TorchModel`` federates ``requires_grad`` parameters).
Every client builds the same backbone from the same seed, as a pretrained one would be loaded
from the same checkpoint.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from fedpipe.common.models.torch_adapter import TorchModel

VOCAB = 64
#: The token whose presence makes a sequence positive (the synthetic task of ``run.py``).
KEYWORD = 1


class SequenceClassifier(torch.nn.Module):
    """Token ids in, class logits out (fedpipe hands inputs over as floats: ids are exact)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids.long()).logits  # type: ignore[no-any-return]


def build(rank: int = 4, hidden: int = 64, layers: int = 2, seed: int = 0) -> TorchModel:
    """BERT with ``layers`` layers of width ``hidden``, LoRA of rank ``rank`` on the attention
    queries and values, and a trainable classification head (two classes)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    backbone = BertForSequenceClassification(config)
    lora = LoraConfig(
        task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, target_modules=["query", "value"]
    )
    model = get_peft_model(backbone, lora)
    return TorchModel(SequenceClassifier(model), torch.nn.CrossEntropyLoss())
