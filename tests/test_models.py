"""Behaviour of the model registry and the plain-torch builders."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nws.models import create_model, list_models, register_model

NUM_CLASSES = 7
INPUTS = {"convnet": (1, 8, 8)}


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_builders() -> None:
    assert {"resnet18", "resnet34", "vgg16_bn", "mobilenet_v2", "convnet"} <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_classifier(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES).eval()
    x = torch.randn(2, *INPUTS.get(name, (3, 32, 32)))
    with torch.no_grad():
        assert model(x).shape == (2, NUM_CLASSES)
    head = model.get_submodule(model.classifier_name)
    assert type(head) is nn.Linear and head.out_features == NUM_CLASSES


@pytest.mark.parametrize("name", list_models())
def test_in_channels(name: str) -> None:
    model = create_model(name, num_classes=3, in_channels=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 2, 32, 32)).shape == (1, 3)


def test_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        create_model("no_such_net")


def test_register_model_adds_name() -> None:
    @register_model
    def _tiny_test_net(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        return nn.Linear(in_channels, num_classes)

    assert "_tiny_test_net" in list_models()
    assert create_model("_tiny_test_net", num_classes=4).out_features == 4


def test_resnet_parameter_counts_match_torchvision() -> None:
    """torchvision's counts (11,689,512 and 21,797,672) with its classifier bias; 1000 fewer without."""
    r18 = create_model("resnet18")
    assert _numel(r18) == 11_689_512 - 1000
    assert _numel(create_model("resnet18", bias=True)) == 11_689_512
    assert sum(m.weight.numel() for m in r18.modules() if isinstance(m, nn.Conv2d)) == 11_166_912
    assert _numel(create_model("resnet34")) == 21_797_672 - 1000
    assert _numel(create_model("resnet34", bias=True)) == 21_797_672


def test_resnet18_state_dict_layout_is_torchvision() -> None:
    sd = create_model("resnet18", bias=True).state_dict()
    assert len(sd) == 122
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "layer2.0.downsample.0.weight",
                "layer4.1.bn2.num_batches_tracked", "layer4.0.downsample.1.bias", "fc.weight", "fc.bias"):
        assert key in sd
    assert "layer1.0.downsample.0.weight" not in sd
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert all(m.bias is None for m in create_model("resnet18").modules() if isinstance(m, nn.Conv2d))
    assert set(create_model("resnet18").state_dict()) == set(sd) - {"fc.bias"}


def _float_owners(model: nn.Module) -> set[str]:
    """What each parameter is: a searched weight (conv/linear) or a float kept per task (anything else)."""
    kinds = set()
    for module in model.modules():
        for name, _ in module.named_parameters(recurse=False):
            if isinstance(module, (nn.Conv2d, nn.Linear)) and name == "weight":
                continue
            kinds.add(f"{type(module).__name__}.{name}")
    return kinds


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "mobilenet_v2", "vgg16_bn", "convnet"])
def test_only_batchnorm_is_float_by_default(name: str) -> None:
    """The reference's networks have no bias anywhere: a task's only float parameters are BatchNorm's."""
    assert _float_owners(create_model(name, num_classes=NUM_CLASSES)) == {"BatchNorm2d.weight", "BatchNorm2d.bias"}


@pytest.mark.parametrize("name, biased", [
    ("resnet18", {"Linear.bias"}),
    ("vgg16_bn", {"Linear.bias", "Conv2d.bias"}),
])
def test_bias_restores_torchvision_biases(name: str, biased: set[str]) -> None:
    model = create_model(name, num_classes=NUM_CLASSES, bias=True)
    assert _float_owners(model) == {"BatchNorm2d.weight", "BatchNorm2d.bias"} | biased


def _classifier_input(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(globally pooled features, what the classifier receives) of one forward pass."""
    seen = {}
    model.avgpool.register_forward_hook(lambda m, i, o: seen.__setitem__("pooled", o.flatten(1)))
    model.get_submodule(model.classifier_name).register_forward_pre_hook(lambda m, i: seen.__setitem__("in", i[0]))
    model(x)
    return seen["pooled"], seen["in"]


def test_dropout_where_the_reference_has_it() -> None:
    """VGG: dropout 0.2 between the pooled features and the classifier; MobileNetV2 and ResNet: none."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    vgg = create_model("vgg16_bn", num_classes=NUM_CLASSES).train()
    pooled, seen = _classifier_input(vgg, x)
    kept = seen != 0
    assert kept.any() and ((seen == 0) & (pooled != 0)).any()  # some features dropped, not all
    torch.testing.assert_close(seen[kept], pooled[kept] / 0.8)  # survivors scaled by 1 / (1 - p)
    with torch.no_grad():
        pooled, seen = _classifier_input(vgg.eval(), x)
    assert torch.equal(seen, pooled)
    for name in ("mobilenet_v2", "resnet18"):
        model = create_model(name, num_classes=NUM_CLASSES).train()
        pooled, seen = _classifier_input(model, x)
        assert torch.equal(seen, pooled), name
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in create_model("mobilenet_v2").modules())
    assert create_model("mobilenet_v2", dropout=0.2).dropout.p == 0.2
    assert create_model("vgg16_bn", dropout=0.0).dropout.p == 0.0


@pytest.mark.parametrize(
    ("stem", "maxpool", "spatial"), [("imagenet", True, 1), ("imagenet", False, 2), ("cifar", True, 4)]
)
def test_resnet_stems(stem: str, maxpool: bool, spatial: int) -> None:
    model = create_model("resnet18", num_classes=10, stem=stem, maxpool=maxpool).eval()
    with torch.no_grad():
        feats = model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(torch.randn(1, 3, 32, 32)))))))))
    assert feats.shape[-1] == spatial
    assert model.conv1.kernel_size == ((7, 7) if stem == "imagenet" else (3, 3))
    has_pool = any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert has_pool == (stem == "imagenet" and maxpool)


def test_resnet_rejects_unknown_stem() -> None:
    with pytest.raises(ValueError):
        create_model("resnet18", stem="tiny")


def test_mobilenet_v2_depthwise_and_count() -> None:
    """torchvision's 3,504,872 parameters less its classifier's 1000 biases."""
    model = create_model("mobilenet_v2")
    assert _numel(model) == 3_504_872 - 1000
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(depthwise) == 17


def test_mobilenet_v2_stem_stride_and_width() -> None:
    small = create_model("mobilenet_v2", num_classes=5, stem_stride=1, width_mult=0.5).eval()
    assert small.features[0][0].stride == (1, 1)
    assert small.features[0][0].out_channels == 16
    with torch.no_grad():
        assert small.features(torch.randn(1, 3, 32, 32)).shape[-1] == 2


def test_vgg16_bn_features() -> None:
    model = create_model("vgg16_bn", num_classes=10)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    assert isinstance(model.features[0], nn.Conv2d) and isinstance(model.features[1], nn.BatchNorm2d)
    assert model.classifier.in_features == 512
    # torchvision vgg16_bn's features (Keras' VGG16 conv base, 14,714,688, plus 8,448 BatchNorm parameters)
    assert _numel(create_model("vgg16_bn", bias=True).features) == 14_714_688 + 8_448
    assert _numel(model.features) == 14_714_688 + 8_448 - 4_224  # less the 13 convs' biases


def test_convnet_widths() -> None:
    model = create_model("convnet", num_classes=10, widths=(8, 16))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 1
    assert convs[0].in_channels == 1 and all(c.bias is None for c in convs)
