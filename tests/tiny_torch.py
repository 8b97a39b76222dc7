"""Small models built from torch's own transformer modules, shared by tests."""
from torch import nn


class TorchEncoder(nn.Module):
    """Linear embedding, an nn.TransformerEncoder of `layers` nn.TransformerEncoderLayer (d 32, 4 heads, FFN 64),
    mean pooling and a 3-way Linear head: inputs (N, L, 8)."""

    def __init__(self, layers: int = 2):
        super().__init__()
        self.emb = nn.Linear(8, 32)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), layers)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))
