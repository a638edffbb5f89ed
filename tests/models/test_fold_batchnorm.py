"""Batch norms folded into convolutions for CPU inference: the same probabilities."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from napari_lnmeta.models.patch import fold_batchnorm


def _randomised(net: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, as after training
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return net.eval()


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_folded_network_gives_the_same_probabilities(arch):
    torch.manual_seed(0)
    net = _randomised(getattr(torchvision.models, arch)(num_classes=2))
    folded = fold_batchnorm(net)
    assert folded is not net
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original kept
    x = torch.rand(6, 3, 96, 96)
    with torch.inference_mode():
        a, b = torch.softmax(net(x), 1), torch.softmax(folded(x), 1)
    assert (a - b).abs().max().item() < 1e-5
    assert (a - b).abs().max().item() < (a - 0.5).abs().max().item()  # not trivially equal


def test_a_loaded_network_is_folded_once_until_its_weights_change():
    net = _randomised(torchvision.models.resnet18(num_classes=2))
    first = fold_batchnorm(net)
    assert fold_batchnorm(net) is first
    with torch.no_grad():
        net.fc.weight.mul_(2.0)
    again = fold_batchnorm(net)
    assert again is not first
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(net(x), again(x), atol=1e-4)


class _Branchy(nn.Module):
    """Data-dependent control flow: cannot be traced symbolically."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.mean() > 0:
            y = y * 2
        return self.fc(y.mean((2, 3)))


def test_untraceable_training_and_plain_networks_are_left_alone():
    net = _Branchy().eval()
    assert fold_batchnorm(net) is net
    train = torchvision.models.resnet18(num_classes=2).train()
    assert fold_batchnorm(train) is train
    plain = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    assert fold_batchnorm(plain) is plain


def test_a_network_with_hooks_is_not_folded():
    net = _randomised(torchvision.models.resnet18(num_classes=2))
    seen = []
    net.layer1.register_forward_hook(lambda *_: seen.append(1))
    assert fold_batchnorm(net) is net
