"""The character-level language models. torch only: no Ray, no data loading.

    ids [B, T] --Embedding--> [B, T, E] --LSTM x L--> [B, T, H] --(head)--> logits [B, T, V]

`CharLSTM` (head = Dropout -> Linear) is raylstm's model, trained with a loss at every position.

A conditioned model (`ModelConfig.conditions`) also reads one id per condition field (rating, category)
at every position, and concatenates their learned embeddings to the character's (Lipton et al. 2015):

    ids [B, T] --Embedding--> [B, T, E] --+
                                          +--concat--> [B, T, E + F*D] --LSTM x L--> ...
    cond [B, T, F] or [B, F] --F x Embedding(D)--> [B, T, F*D]

cond [B, F] holds for every position of the row; None means every field missing (id 0), so code that
knows nothing of conditions (evaluation, sampling without a condition) runs a conditioned model as is.
An unconditioned model has no condition embeddings at all: its weights are exactly an older model's.
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
        if len(cfg.condition_sizes) != len(cfg.conditions):
            raise ValueError(
                f"ModelConfig.condition_sizes {cfg.condition_sizes} must be set from the condition vocabulary "
                f"(one size per field of {cfg.conditions}) before building"
            )
        # Registered only when conditioned, so an unconditioned model's state_dict is what it always was.
        if cfg.conditions:
            self.cond_embed = nn.ModuleList(nn.Embedding(n, cfg.condition_dim) for n in cfg.condition_sizes)
        self.lstm = nn.LSTM(
            cfg.embed_dim + len(cfg.conditions) * cfg.condition_dim,
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.head = self._make_head(cfg)

    def _make_head(self, cfg: ModelConfig) -> nn.Module:
        return nn.Linear(cfg.hidden_size, cfg.vocab_size)

    @property
    def conditioned(self) -> bool:
        return bool(self.cfg.conditions)

    def inputs(self, ids: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The LSTM's input [B, T, E (+ F*D)]: character embeddings, plus condition embeddings if any."""
        x = self.embed(ids)
        if not self.cfg.conditions:
            if cond is not None:
                raise ValueError("this model is not conditioned: it takes no condition ids")
            return x
        B, T = ids.shape
        F = len(self.cfg.conditions)
        if cond is None:
            cond = torch.zeros(B, T, F, dtype=torch.long, device=ids.device)  # every field missing
        elif cond.dim() == 2:
            cond = cond[:, None, :].expand(B, T, F)
        if cond.shape != (B, T, F):
            raise ValueError(f"condition ids must be [B, T, {F}] or [B, {F}], got {tuple(cond.shape)}")
        parts = [x, *(emb(cond[..., j]) for j, emb in enumerate(self.cond_embed))]
        return torch.cat(parts, dim=-1)

    def forward(
        self, ids: torch.Tensor, state: LSTMState | None = None, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        out, state = self.lstm(self.inputs(ids, cond), state)
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

    def forward(
        self, ids: torch.Tensor, state: LSTMState | None = None, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        # Keras applies no dropout between the LSTM and the Dense layer.
        out, state = self.lstm(self.inputs(ids, cond), state)
        return self.head(out), state


def build_model(cfg: ModelConfig) -> CharLSTM:
    return {"lstm": CharLSTM, "seed": SeedLSTM}[cfg.kind](cfg)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (Ray's prepare_model wraps only when world size > 1)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
