"""Branch-head variants, the pairwise loss term, class-grouped batches, the few-class warning and the
unseen-typeface dataset: each flag changes the computation as its help says, checked by hand."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_args
from reir.cli.train import get_args_parser
from reir.cli.train import main as train_main
from reir.errors import UsageError
from reir.model.heads import CosineHead
from reir.model.meta_labels import balanced_groupings, grouping_room
from reir.model.network import ModelConfig, create_model
from reir.training.config import TrainConfig
from reir.training.losses import concatenated_embedding, pair_term
from reir.training.train import train_one_epoch


def _model(**head) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig("resnet18", "layer3", 3, 4, **head), weights="none").double().eval()


def _pooled(model, branch: int, images: torch.Tensor) -> torch.Tensor:
    """A branch's features after pooling, computed from its modules directly."""
    x = model.stem(images)
    for module in model.branches[branch]:
        x = module(x)
        if isinstance(module, torch.nn.Flatten):
            return x
    raise AssertionError("no Flatten in the branch")


def test_default_head_is_the_original_linear_classifier():
    model = _model()
    assert all(isinstance(branch[-1], torch.nn.Linear) and branch[-1].out_features == 4 for branch in model.branches)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    head = model.branches[1][-1]
    torch.testing.assert_close(model(images)[:, 1], _pooled(model, 1, images) @ head.weight.T + head.bias)


@pytest.mark.parametrize("learn", [False, True])
def test_cosine_head_logits_are_scale_times_cosine(learn):
    model = _model(head="cosine", head_scale=8.0, learn_scale=learn)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    logits = model(images)
    for branch in range(3):
        pooled, weight = _pooled(model, branch, images), model.branches[branch][-1].weight
        cosine = F.cosine_similarity(pooled[:, None, :], weight[None, :, :], dim=-1)
        torch.testing.assert_close(logits[:, branch], 8.0 * cosine)
    assert logits.abs().max() <= 8.0 + 1e-9
    scales = [name for name, _ in model.named_parameters() if name.endswith("log_scale")]
    assert len(scales) == (3 if learn else 0)
    assert all(name.endswith("log_scale") for name in model.state_dict() if "scale" in name)


def test_learned_scale_gets_a_gradient_and_fixed_does_not():
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    learned = _model(head="cosine", learn_scale=True).train()
    F.cross_entropy(learned(images).flatten(0, 1), torch.tensor([0, 1, 2, 3] * 3)).backward()
    assert all(branch[-1].log_scale.grad is not None and branch[-1].log_scale.grad != 0 for branch in learned.branches)
    fixed = _model(head="cosine")
    assert not fixed.branches[0][-1].log_scale.requires_grad


def test_projection_is_a_linear_relu_before_the_head():
    model = _model(projection=5)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    projection, head = model.branches[2][-3], model.branches[2][-1]
    assert (projection.in_features, projection.out_features, head.in_features) == (512, 5, 5)
    hidden = torch.relu(_pooled(model, 2, images) @ projection.weight.T + projection.bias)
    torch.testing.assert_close(model(images)[:, 2], hidden @ head.weight.T + head.bias)


@pytest.mark.parametrize("head", [dict(head="cosine", learn_scale=True), dict(head="cosine", projection=6),
                                  dict(projection=6)])
def test_grouped_branches_match_the_loop_for_every_head(head):
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    loop, grouped = _model(**head).train(), _model(**head).train()
    grouped.branch_batching = "grouped"
    expected, got = loop(images), grouped(images)
    torch.testing.assert_close(got, expected)
    expected.square().sum().backward()
    got.square().sum().backward()
    for (name, a), b in zip(loop.named_parameters(), grouped.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_concatenated_embedding_dot_product_is_the_mean_branch_cosine():
    logits = torch.randn(5, 4, 3, dtype=torch.float64)
    flat = concatenated_embedding(logits).double()
    expected = F.cosine_similarity(logits[:, None], logits[None, :], dim=-1).mean(-1)
    torch.testing.assert_close(flat @ flat.T, expected, atol=1e-6, rtol=1e-6)


def _multi_similarity_by_hand(embeddings, labels, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    """MultiSimilarity (Wang et al. 2019) with its hard-pair mining, one anchor at a time."""
    x = F.normalize(embeddings, dim=-1)
    similarity = x @ x.T
    losses = []
    for i in range(len(labels)):
        same = (labels == labels[i]) & (torch.arange(len(labels)) != i)
        other = labels != labels[i]
        pos, neg = similarity[i][same], similarity[i][other]
        if len(pos) == 0 or len(neg) == 0:
            losses.append(similarity.new_zeros(()))
            continue
        hard_neg = neg[neg + epsilon > pos.min()]
        hard_pos = pos[pos - epsilon < neg.max()]
        if len(hard_neg) == 0 or len(hard_pos) == 0:  # the miner keeps an anchor only with both kinds
            losses.append(similarity.new_zeros(()))
            continue
        losses.append(torch.log1p(torch.exp(-alpha * (hard_pos - base)).sum()) / alpha
                      + torch.log1p(torch.exp(beta * (hard_neg - base)).sum()) / beta)
    return torch.stack(losses).mean()


def test_pair_term_is_the_weighted_multisimilarity_of_the_concatenated_embedding():
    torch.manual_seed(0)
    logits = torch.randn(12, 4, 3)
    targets = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    expected = _multi_similarity_by_hand(concatenated_embedding(logits), targets)
    assert expected > 0
    torch.testing.assert_close(pair_term("multisimilarity", 0.5)(logits, targets), 0.5 * expected,
                               atol=1e-5, rtol=1e-5)
    assert pair_term("none", 1.0) is None and pair_term("multisimilarity", 0.0) is None


def test_extra_loss_is_added_to_the_cross_entropy():
    """A constant extra term leaves the gradients alone, so the epoch's mean loss rises by exactly it."""
    torch.manual_seed(0)
    images, targets = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 2)
    loader = [(images[:4], targets[:4]), (images[4:], targets[4:])]
    meta_labels = torch.tensor([[0, 1, 0, 1], [0, 0, 1, 1]])
    losses = []
    for extra in (None, lambda logits, batch_targets: torch.tensor(0.75)):
        torch.manual_seed(0)
        model = create_model(ModelConfig("resnet18", "layer4", 2, 2), weights="none")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses.append(train_one_epoch(model, loader, optimizer, meta_labels, torch.device("cpu"), 1, 1,
                                      extra_loss=extra)[0])
    assert losses[1] == pytest.approx(losses[0] + 0.75, abs=1e-5)


def test_class_grouped_batches_hold_runs_of_one_class():
    from reir.data.sampling import CappedClassSampler, class_sampler

    targets = torch.tensor([c for c in range(5) for _ in range(9)])
    sampler = class_sampler(targets, cap=8, seed=3, per_class=4)
    sampler.set_epoch(2)
    order = sampler.indices()
    assert len(order) == len(set(order)) == len(CappedClassSampler(targets, cap=8)) == 40
    runs = [targets[order[i:i + 4]] for i in range(0, 40, 4)]
    assert all((run == run[0]).all() for run in runs)
    assert sorted(int(run[0]) for run in runs) == [c for c in range(5) for _ in range(2)]
    assert order != sorted(order)
    plain = class_sampler(targets, cap=8, seed=3)
    assert type(plain) is CappedClassSampler


def _balanced_groupings_by_enumeration(classes: int, groups: int) -> int:
    sizes = {frozenset(frozenset(c for c in range(classes) if labels[c] == g) for g in range(groups))
             for labels in itertools.product(range(groups), repeat=classes)
             if max(np.bincount(labels, minlength=groups)) - min(np.bincount(labels, minlength=groups)) <= 1}
    return len(sizes)


@pytest.mark.parametrize("classes,groups", [(5, 2), (4, 2), (6, 3), (7, 3), (6, 2), (8, 4)])
def test_balanced_groupings_counts_what_enumeration_finds(classes, groups):
    assert balanced_groupings(classes, groups) == _balanced_groupings_by_enumeration(classes, groups)


def test_few_classes_warn_that_meta_classes_have_no_room(small_digits_root, tmp_path, caplog):
    assert "10 different groupings" in grouping_room(5, 48, 2)
    assert "single class" in grouping_room(20, 4, 12)
    assert grouping_room(300, 48, 12) is None
    with caplog.at_level(logging.WARNING, logger="reir.training.train"):
        assert train_main(tiny_args(small_digits_root, tmp_path, "--ensemble_size", "12", "--image_size", "16")) == 0
    assert any("meta classes have no room" in r.getMessage() and "10 different groupings" in r.getMessage()
               for r in caplog.records)


def test_head_flags_reach_the_model_and_are_checked():
    args = get_args_parser().parse_args(["--head", "cosine", "--head_scale", "8", "--learn_scale", "--projection",
                                         "16", "--pair_loss", "multisimilarity", "--pair_weight", "0.5",
                                         "--samples_per_class", "4"])
    config = TrainConfig.from_args(args)
    assert (config.model.head, config.model.head_scale, config.model.learn_scale, config.model.projection) == (
        "cosine", 8.0, True, 16)
    assert (config.pair_loss, config.pair_weight, config.samples_per_class) == ("multisimilarity", 0.5, 4)
    assert TrainConfig().model == ModelConfig("resnet18", "layer1", 48, 12)
    for bad, field in ((dict(head_scale=0.0), "head_scale"), (dict(pair_weight=-1.0), "pair_weight"),
                       (dict(head="mlp"), "head"), (dict(projection=-1), "projection")):
        with pytest.raises(UsageError, match=field):
            TrainConfig(**bad)


def test_a_cosine_model_with_the_pair_term_trains_and_loads_back(small_digits_root, tmp_path):
    import reir

    assert train_main(tiny_args(small_digits_root, tmp_path, "--head", "cosine", "--learn_scale", "--projection",
                                "8", "--pair_loss", "multisimilarity", "--samples_per_class", "4",
                                "--image_size", "16")) == 0
    (model_file,) = (tmp_path / "epochs").glob("*_model.safetensors")
    model = reir.load_model(model_file)
    assert isinstance(model.network.branches[0][-1], CosineHead)
    assert model.network.branches[0][-3].out_features == 8


def test_unseen_fonts_split_has_disjoint_classes_and_fonts(tmp_path):
    from reir.data.fonts import TEST_FONTS, TRAIN_FONTS, prepare_fonts

    split_list = prepare_fonts(tmp_path, limit=30)
    fonts = {split: {Path(p).stem for p in s.paths} for split, s in split_list.splits.items()}
    assert fonts["train"] == {Path(f).stem for f in TRAIN_FONTS}
    assert fonts["test"] == {Path(f).stem for f in TEST_FONTS}
    assert not fonts["train"] & fonts["test"]
    classes = {split: set(s.classes) for split, s in split_list.splits.items()}
    assert classes["train"] and classes["test"] and not classes["train"] & classes["test"]
    assert all(chr(int(c[2:], 16)).isalnum() for c in classes["test"])
    for split, per_class in (("train", len(TRAIN_FONTS)), ("test", len(TEST_FONTS))):
        labels = split_list.splits[split].labels
        assert all(labels.count(c) == per_class for c in classes[split])
    assert all((split_list.root / p).is_file() for s in split_list.splits.values() for p in s.paths)
