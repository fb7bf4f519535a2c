"""The character-level language models. torch only: no Ray, no data loading.

    ids [B, T] --Embedding--> [B, T, E] --LSTM x L--> [B, T, H] --(head)--> logits [B, T, V]

`CharLSTM` (head = Dropout -> Linear) is raylstm's model, trained with a loss at every position.
`SeedLSTM` (head = Dense(ReLU) -> Dropout -> Linear) is the original Keras project's model:
Embedding(128) -> LSTM(128) -> Dense(256, ReLU) -> Dropout(0.5) -> softmax, trained on the last position
of 40-char windows only. Both take and return the LSTM state so that sampling can feed one character at
a time without re-reading the prime.
"""

from __future__ import annotations

import torch
from torch import nn

from raylstm.config import ModelConfig

LSTMState = tuple[torch.Tensor, torch.Tensor]  # (h, c), each [num_layers, B, H]


class CharLSTM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 1:
            raise ValueError("ModelConfig.vocab_size must be set from the vocabulary before building")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.lstm = nn.LSTM(
            cfg.embed_dim,
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.head = self._make_head(cfg)

    def _make_head(self, cfg: ModelConfig) -> nn.Module:
        return nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, ids: torch.Tensor, state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        out, state = self.lstm(self.embed(ids), state)
        return self.head(self.drop(out)), state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class SeedLSTM(CharLSTM):
    """The original project's model; `dropout` here is the Dropout after the Dense layer (0.5 there)."""

    def _make_head(self, cfg: ModelConfig) -> nn.Module:
        return nn.Sequential(
            nn.Linear(cfg.hidden_size, cfg.seed_dense),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.seed_dense, cfg.vocab_size),
        )

    def forward(self, ids: torch.Tensor, state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        # Keras applies no dropout between the LSTM and the Dense layer.
        out, state = self.lstm(self.embed(ids), state)
        return self.head(out), state


def build_model(cfg: ModelConfig) -> CharLSTM:
    return {"lstm": CharLSTM, "seed": SeedLSTM}[cfg.kind](cfg)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (Ray's prepare_model wraps only when world size > 1)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
