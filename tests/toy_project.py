"""A small on-disk project (model spec, data spec, trained checkpoint) for CLI and loading tests."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

SPEC_SOURCE = textwrap.dedent(
    '''
    import torch
    from torch import nn


    def build_model(width=8):
        return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3))


    def build_bn_model(width=8):
        return nn.Sequential(nn.Linear(5, width), nn.BatchNorm1d(width), nn.Tanh(), nn.Linear(width, 3))


    def load_data(num_samples=96, note=""):
        generator = torch.Generator().manual_seed(1)
        inputs = torch.randn(num_samples, 5, generator=generator)
        targets = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0.5).long()
        return inputs, targets


    def load_loader(num_samples=96):
        inputs, targets = load_data(num_samples)
        dataset = torch.utils.data.TensorDataset(inputs, targets)
        return torch.utils.data.DataLoader(dataset, batch_size=10, shuffle=True)


    def empty_data():
        return torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)


    def not_a_model():
        return 42


    NOT_CALLABLE = 3


    def text_data():
        return "inputs and targets"


    def summed_loss(outputs, targets):
        return torch.nn.functional.cross_entropy(outputs, targets)
    '''
)


@dataclass
class ToyProject:
    folder: Path
    spec_file: Path
    checkpoint: Path
    lr: float

    def spec(self, name: str) -> str:
        return f"{self.spec_file}:{name}"


def write_toy_project(folder: Path, *, lr: float = 0.5, steps: int = 30, model: str = "build_model") -> ToyProject:
    """Write the spec file and train the toy model briefly with SGD, saving one checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_file = folder / "toyspec.py"
    spec_file.write_text(SPEC_SOURCE)
    namespace: dict = {}
    exec(compile(SPEC_SOURCE, str(spec_file), "exec"), namespace)
    torch.manual_seed(0)
    network = namespace[model]()
    inputs, targets = namespace["load_data"]()
    optimizer = torch.optim.SGD(network.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(inputs), targets).backward()
        optimizer.step()
    checkpoint = folder / "toy.pt"
    torch.save(
        {"model_state_dict": network.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "step": steps},
        checkpoint,
    )
    return ToyProject(folder, spec_file, checkpoint, lr)
