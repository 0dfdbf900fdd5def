"""The CLEVR Relation Network (Santoro et al. 2017) as the supplement describes it (Appendix B).

Written so that ``torch.fx.symbolic_trace`` works on it: question lengths come from the padding
index, pairs are built with unsqueeze/repeat/cat, and no Python control flow depends on data.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import CanonizationError


def _coordinates(height: int, width: int) -> Tensor:
    """(1, height * width, 2) normalized (x, y) grid coordinates in [-1, 1], row-major."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1).unsqueeze(0)


class RelationNetwork(nn.Module):
    """Image encoder (4 x Conv -> ReLU -> BatchNorm), LSTM question encoder, relation MLPs g and f.

    ``padding=0`` is the CLEVR-XAI layout (3x127x127 -> 24x7x7 = 49 objects); ``padding=1``
    pads the convolutions as other public implementations do (3x128x128 -> 24x8x8 = 64 objects).
    """

    coordinates: Tensor

    def __init__(self, image_size: int | None = None, padding: int = 0, vocabulary: int = 82,
                 embedding: int = 32, hidden: int = 128, channels: int = 24, answers: int = 28) -> None:
        super().__init__()
        self.image_size = image_size or (127 if padding == 0 else 128)
        blocks: list[nn.Module] = []
        size, in_channels = self.image_size, 3
        for _ in range(4):
            blocks += [nn.Conv2d(in_channels, channels, 3, stride=2, padding=padding), nn.ReLU(),
                       nn.BatchNorm2d(channels)]
            size, in_channels = (size + 2 * padding - 3) // 2 + 1, channels
        if size < 1:
            raise CanonizationError(f"image_size {self.image_size} is too small for four stride-2 convolutions")
        self.encoder = nn.Sequential(*blocks)
        self.grid = size
        self.register_buffer("coordinates", _coordinates(size, size), persistent=False)
        self.embedding = nn.Embedding(vocabulary, embedding, padding_idx=0)
        self.lstm = nn.LSTM(embedding, hidden, batch_first=True)
        pair = 2 * (channels + 2) + hidden
        self.g = nn.Sequential(nn.Linear(pair, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                               nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        self.f = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.5),
                               nn.Linear(256, answers))

    def encode_question(self, question: Tensor) -> Tensor:
        """Last valid LSTM hidden state; tokens equal to the padding index 0 end a question."""
        lengths = (question != 0).sum(1).clamp(min=1)
        states, _ = self.lstm(self.embedding(question))
        index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, states.size(2))
        return states.gather(1, index).squeeze(1)

    def forward(self, image: Tensor, question: Tensor) -> Tensor:
        features = self.encoder(image)  # (N, C, H, W)
        n, c = features.size(0), features.size(1)
        objects = features.view(n, c, -1).permute(0, 2, 1)  # (N, P, C)
        coordinates = self.coordinates.to(objects).expand(n, -1, -1)
        objects = torch.cat([objects, coordinates], 2)  # (N, P, C + 2)
        p = objects.size(1)
        x_i = objects.unsqueeze(2).repeat(1, 1, p, 1)  # object i of pair (i, j)
        x_j = objects.unsqueeze(1).repeat(1, p, 1, 1)  # object j of pair (i, j)
        q = self.encode_question(question)
        q = q.view(n, 1, 1, -1).repeat(1, p, p, 1)
        pairs = torch.cat([x_i, x_j, q], 3).view(n * p * p, -1)
        relations = self.g(pairs).view(n, p * p, -1).sum(1)
        return self.f(relations)

    def example_inputs(self, batch_size: int = 2, length: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
        """A random image batch and padded questions of different lengths."""
        generator = torch.Generator().manual_seed(seed)
        image = torch.randn(batch_size, 3, self.image_size, self.image_size, generator=generator)
        question = torch.randint(1, self.embedding.num_embeddings, (batch_size, length), generator=generator)
        for row in range(batch_size):
            question[row, max(1, length - row * 3):] = 0
        return image, question
