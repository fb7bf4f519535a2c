"""raylstm: character-level LSTM language models on review corpora, trained and served with Ray."""

__version__ = "0.1.0"
