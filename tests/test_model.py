"""The network: parameter table, shapes, sharing, random branch weights."""

import pytest
import torch

from reir.errors import ReirError
from reir.model.embedding import embed
from reir.model.network import ModelConfig, count_parameters, create_model, embedding_from_logits

# The original's table (REIR.md): defaults share_type layer1, ensemble 48.
TABLE = {
    "resnet18": (529_365_376, 541_677_376, 533_797_696),
    "resnet34": (1_011_079_808, 1_023_391_808, 1_015_512_128),
    "resnet50": (1_118_974_592, 1_168_150_592, 1_136_677_952),
    "resnext50_32x4d": (1_094_093_696, 1_143_269_696, 1_111_797_056),
}


@pytest.mark.parametrize("model_type", list(TABLE))
def test_parameter_table(model_type):
    counts = tuple(count_parameters(ModelConfig(model_type=model_type, meta_class_size=m)) for m in (12, 512, 192))
    assert counts == TABLE[model_type]


def test_parameter_count_follows_independent_formula():
    """stem + E * (rest + classifier), counted from a plain torchvision ResNet."""
    from torchvision.models import resnet18

    net = resnet18()

    def size(*mods):
        return sum(p.numel() for m in mods for p in m.parameters())

    for share, stem_mods, rest_mods in [
        ("none", [], [net.conv1, net.bn1, net.layer1, net.layer2, net.layer3, net.layer4]),
        ("layer2", [net.conv1, net.bn1, net.layer1, net.layer2], [net.layer3, net.layer4]),
        ("layer4", [net.conv1, net.bn1, net.layer1, net.layer2, net.layer3, net.layer4], []),
    ]:
        expected = size(*stem_mods) + 5 * (size(*rest_mods) + 512 * 7 + 7)
        assert count_parameters(ModelConfig("resnet18", share, 5, 7)) == expected


@pytest.mark.parametrize("share_type", ["none", "maxpool", "layer1", "layer3", "layer4"])
def test_forward_shape_and_branch_independence(share_type):
    torch.manual_seed(0)
    model = create_model(ModelConfig("resnet18", share_type, 3, 4), weights="none").eval()
    images = torch.randn(2, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (2, 3, 4)
    # Branches start from the same backbone weights but have their own classifiers and parameters.
    assert not torch.allclose(logits[:, 0], logits[:, 1])
    params = [set(id(p) for p in b.parameters()) for b in model.branches]
    assert not params[0] & params[1]


def test_embedding_is_unit_norm_per_branch():
    logits = torch.randn(5, 3, 4) * 10
    embedding = embedding_from_logits(logits)
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(5, 3), atol=1e-6)


def test_random_branch_weights_only_in_training():
    """As in the original: one softmax(U(0,1)) vector per forward pass, shared by the whole batch."""
    torch.manual_seed(0)
    model = create_model(ModelConfig("resnet18", "layer1", 4, 3, with_random=True), weights="none")
    images = torch.randn(3, 3, 32, 32)
    weights = model.branch_weights(3, images.device, images.dtype)
    assert weights.shape == (3, 4)
    assert torch.allclose(weights.sum(1), torch.ones(3))
    assert (weights > 0).all() and torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])
    # softmax of values in [0, 1): no weight reaches e times another
    assert weights[0].max() / weights[0].min() < torch.e
    assert not torch.equal(weights, model.branch_weights(3, images.device, images.dtype))  # a new draw per pass
    model.eval()
    assert model.branch_weights(3, images.device, images.dtype) is None
    # In eval the output is deterministic; in train mode with_random changes it between calls.
    assert torch.equal(model(images), model(images))
    plain = create_model(ModelConfig("resnet18", "layer1", 4, 3, with_random=False), weights="none")
    plain.train()
    assert plain.branch_weights(3, images.device, images.dtype) is None


def test_random_branch_weights_scale_the_shared_features(monkeypatch):
    """The branch input is the shared map times softmax(U(0,1)) of that sample and branch."""
    torch.manual_seed(0)
    model = create_model(ModelConfig("resnet18", "layer1", 2, 3, with_random=True), weights="none").train()
    fixed = torch.tensor([[0.25, 0.75], [0.6, 0.4]])
    monkeypatch.setattr(model, "branch_weights", lambda *a: fixed)
    seen = []
    for index, branch in enumerate(model.branches):
        branch.register_forward_pre_hook(lambda m, inp, index=index: seen.append((index, inp[0].clone())))
    images = torch.randn(2, 3, 32, 32)
    model(images)
    shared = model.stem(images)
    for index, features in seen:
        assert torch.allclose(features, shared * fixed[:, index].view(-1, 1, 1, 1), atol=1e-6)


@pytest.mark.parametrize("branch_batching", ["loop", "grouped"])
def test_every_image_of_a_batch_gets_the_same_branch_weights(monkeypatch, branch_batching):
    """Measured on the branch inputs of a real forward pass: input = shared map x w[branch], w alike for all images."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = create_model(ModelConfig("resnet18", "layer3", 3, 4, with_random=True), weights="none").train()
    model.branch_batching = branch_batching
    images = torch.randn(5, 3, 32, 32)
    shared = model.stem(images)  # training-mode BatchNorm: the same batch gives the same map as in the pass
    seen = []
    model.stem.register_forward_hook(lambda *_: seen.clear())  # keep only what enters the branches
    if branch_batching == "loop":
        for branch in model.branches:
            branch.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach()))
    else:  # the weighted copies enter the first grouped convolution side by side along the channels
        conv2d = F.conv2d

        def first_convolution(x, *args, **kwargs):
            if not seen:
                seen.extend(x.detach().chunk(len(model.branches), dim=1))
            return conv2d(x, *args, **kwargs)

        monkeypatch.setattr(F, "conv2d", first_convolution)
    model(images)
    assert len(seen) == 3
    # input / shared map, one least-squares number per (image, branch)
    ratios = torch.stack([(x * shared).flatten(1).sum(1) / (shared * shared).flatten(1).sum(1) for x in seen], 1)
    assert torch.allclose(ratios, ratios[:1].expand_as(ratios), atol=1e-6), ratios
    assert torch.allclose(ratios.sum(1), torch.ones(5), atol=1e-5)
    assert ratios[0].max() - ratios[0].min() > 1e-3  # really weighted, not all 1/3


def test_evaluation_is_unweighted_with_random():
    """In eval mode a with_random model computes exactly what the same weights without it compute."""
    torch.manual_seed(0)
    randomised = create_model(ModelConfig("resnet18", "layer2", 3, 4, with_random=True), weights="none").eval()
    plain = create_model(ModelConfig("resnet18", "layer2", 3, 4, with_random=False), weights="none").eval()
    plain.load_state_dict(randomised.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(randomised(images), plain(images))


def test_offline_imagenet_weights_error_names_file_and_fix(monkeypatch, tmp_path):
    import socket

    def refuse(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ReirError) as info:
        create_model(ModelConfig("resnet34", "layer1", 2, 3), weights="imagenet")
    message = str(info.value)
    assert "resnet34-b627a593.pth" in message and str(tmp_path) in message and "`weights` none" in message


def test_weights_from_a_state_dict_file(tmp_path):
    from torchvision.models import resnet18

    source = resnet18()
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    model = create_model(ModelConfig("resnet18", "layer1", 2, 3), weights=str(path))
    assert torch.equal(model.stem[0].weight, source.conv1.weight)
    assert torch.equal(model.branches[1][0][0].conv1.weight, source.layer2[0].conv1.weight)


def test_weights_of_another_architecture_are_a_one_line_refusal(tmp_path):
    """Regression: tensors of other shapes (resnet34's with a 5x5 stem for a resnet18) escaped as a
    RuntimeError traceback from load_state_dict."""
    from torchvision.models import resnet18

    state = resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(ReirError, match="is not a resnet18 state dict \\(its tensors have other shapes\\)"):
        create_model(ModelConfig("resnet18", "layer1", 2, 3), weights=str(path))


def test_shards_follow_the_model_when_it_moves():
    """Regression: the shard plan kept naming the devices it was placed on after ``.to()`` moved the model."""
    model = create_model(ModelConfig("resnet18", "layer1", 3, 4), weights="none").eval()
    model.shard([torch.device("cpu"), torch.device("cpu")])
    model.to("meta")
    assert [(device.type, list(group)) for device, group in model.shards] == [("meta", [0, 1]), ("meta", [2])]
    logits = model(torch.empty(2, 3, 16, 16, device="meta"))
    assert logits.device.type == "meta" and logits.shape == (2, 3, 4)


def test_embed_runs_in_eval_mode_and_keeps_the_callers_mode():
    """Regression: ``embed`` on a model in training mode used batch statistics and random branch weights."""
    torch.manual_seed(0)
    model = create_model(ModelConfig("resnet18", "layer1", 3, 4, with_random=True), weights="none").train()
    images = torch.randn(4, 3, 32, 32)
    buffers = [b.clone() for b in model.buffers()]
    embedding = embed(model, images)
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers())), "running statistics changed"
    with torch.no_grad():
        expected = embedding_from_logits(model.eval()(images))
    torch.testing.assert_close(embedding, expected)


def test_unknown_branch_batching_is_refused():
    model = create_model(ModelConfig("resnet18", "layer1", 2, 3), weights="none")
    with pytest.raises(ReirError, match="branch batching"):
        model.branch_batching = "auto"
