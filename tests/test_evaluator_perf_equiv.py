"""The prefix-caching SupernetEvaluator returns exactly what the plain path returns."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from swr.envs.evaluator import SupernetEvaluator
from swr.reparam import reparam_layers
from swr.supernet import build_supernet
from swr.tasks.backbones import create_backbone
from swr.tasks.base import Task, tensor_split

from fixtures import tiny_audio_task


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy 2-core box thrashes on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def image_task(n_train=48, n_val=20, seed=0) -> Task:
    g = torch.Generator().manual_seed(seed)

    def split(n):
        return tensor_split(torch.randn(n, 3, 32, 32, generator=g),
                            torch.randint(0, 5, (n,), generator=g))

    return Task(id="img", modality="image", class_names=[f"c{i}" for i in range(5)],
                train=split(n_train), val=split(n_val), test=split(4), input_shape=(3, 32, 32))


def trained_looking_supernet(backbone: str, task: Task, **kw) -> torch.nn.Module:
    """A supernet whose deltas and BN statistics are far from their initial values,
    so every selection (and every recalibration) changes the logits."""
    torch.manual_seed(0)
    model = build_supernet(create_backbone(backbone, num_classes=task.num_classes, **kw),
                           task.num_classes)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in reparam_layers(model).values():
            scale = layer.base_layer.weight.std() * 0.3 + 1e-3
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * scale)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


def random_selections(names, n, seed=0):
    rng = random.Random(seed)
    sels = [(), tuple(names)]
    for _ in range(n):
        first = rng.randrange(len(names))  # first open gate anywhere, sparse after it
        sels.append(tuple(x for i, x in enumerate(names) if i >= first and
                          (i == first or rng.random() < 0.2)))
    return sels


CASES = [
    ("bcresnet-1", lambda: tiny_audio_task(n_classes=4, per_class=24), {}),
    ("timm:resnet10t", image_task, {}),
    ("timm:vit_tiny_patch16_224", image_task, {"img_size": 32}),
]


@pytest.mark.parametrize("bn_stats,bn_clips", [("train", None), ("val", None), ("val", 5)],
                         ids=["train", "val", "val-5-clips"])
@pytest.mark.parametrize("backbone,make_task,kw", CASES, ids=[c[0] for c in CASES])
def test_prefix_cache_gives_identical_logits(backbone, make_task, kw, bn_stats, bn_clips):
    task = make_task()
    supernet = trained_looking_supernet(backbone, task, **kw)
    state = {k: v.clone() for k, v in supernet.state_dict().items()}
    opts = dict(bn_batches=3, bn_batch_size=16, batch_size=12, seed=3, bn_stats=bn_stats,
                bn_clips=bn_clips)
    plain = SupernetEvaluator(copy.deepcopy(supernet), task, prefix_cache_mb=0, **opts)
    fast = SupernetEvaluator(supernet, task, prefix_min_skip=0.0, **opts)  # every boundary
    selections = random_selections(plain.names, 8)
    for sel in selections + selections[::-1]:  # again, now from the filled cache
        expected, got = plain.val_logits(sel), fast.val_logits(sel)
        assert len(expected) == len(got) == len(fast._val) > 1
        for a, b in zip(expected, got):
            assert torch.equal(a, b), sel
    assert [fast(s) for s in selections[:3]] == [plain(s) for s in selections[:3]]
    # every metric comes from the same logits: the log-likelihood is bit-identical too
    assert [fast.scores(s) for s in selections[:3]] == [plain.scores(s) for s in selections[:3]]
    info = fast.prefix_cache_info()
    assert info["enabled"] and info["boundaries"] and info["hits"] > len(selections)
    # scoring leaves the supernet exactly as it was
    for k, v in supernet.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_prefix_cache_respects_its_memory_cap():
    task = tiny_audio_task(n_classes=4, per_class=12)
    supernet = trained_looking_supernet("bcresnet-1", task)
    opts = dict(bn_batches=2, bn_batch_size=16, seed=0)
    plain = SupernetEvaluator(copy.deepcopy(supernet), task, prefix_cache_mb=0, **opts)
    capped = SupernetEvaluator(supernet, task, prefix_cache_mb=0.05, **opts)
    for sel in random_selections(plain.names, 4, seed=1):
        assert capped(sel) == plain(sel)
        assert capped.prefix_cache_info()["bytes"] <= 0.05 * 2**20


def test_prefix_cache_records_only_boundaries_that_skip_enough():
    task = tiny_audio_task(n_classes=4, per_class=12)
    supernet = trained_looking_supernet("bcresnet-1", task)
    opts = dict(bn_batches=2, bn_batch_size=16, seed=0)
    plain = SupernetEvaluator(copy.deepcopy(supernet), task, prefix_cache_mb=0, **opts)
    fast = SupernetEvaluator(supernet, task, prefix_min_skip=0.5, **opts)
    for sel in random_selections(plain.names, 10, seed=4):
        assert fast(sel) == plain(sel)
    p = fast._prefix
    assert p.cache and all(p.work_before[p.end[b]] >= 0.5 for b in p.cache)
    # the skipped share of the forward grows along the call order, from ~0 to 1
    assert p.work_before[0] < 0.1 and p.work_before[-1] == 1.0


def test_a_failing_replay_falls_back_to_the_plain_path(monkeypatch):
    task = tiny_audio_task(n_classes=4, per_class=12)
    supernet = trained_looking_supernet("bcresnet-1", task)
    opts = dict(bn_batches=2, bn_batch_size=16, seed=0)
    plain = SupernetEvaluator(copy.deepcopy(supernet), task, prefix_cache_mb=0, **opts)
    fast = SupernetEvaluator(supernet, task, **opts)
    sel = random_selections(plain.names, 1, seed=2)[-1]

    def broken(self, selection):
        raise RuntimeError("replay broke")

    monkeypatch.setattr(type(fast._prefix), "logits", broken)
    assert fast(sel) == plain(sel)
    assert not fast.prefix_cache_info()["enabled"]


def matches_reference(got, ref_model, ev, supernet, state, atol):
    """The evaluator's logits equal ``ref_model``'s on its validation batches, and
    scoring left the supernet's state as it was."""
    with torch.no_grad():
        expected = [ref_model(x) for x, _ in ev._val]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    for k, v in supernet.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_val_statistics_normalise_each_batch_by_its_own_statistics():
    """bn_stats="val": the logits of a selection are the merged model's in training-mode
    BatchNorm on each (near-equal) validation batch; no training clip is read, the
    supernet's statistics come back untouched, and "supernet" keeps them throughout."""
    from swr.fold import merge, unmerge
    from swr.reparam import set_selection

    task = tiny_audio_task(n_classes=4, per_class=24)
    supernet = trained_looking_supernet("bcresnet-1", task)
    state = {k: v.clone() for k, v in supernet.state_dict().items()}
    ev = SupernetEvaluator(supernet, task, batch_size=10, bn_stats="val", prefix_cache_mb=0)
    assert len(task.val) == 32 and [len(x) for x, _ in ev._val] == [8, 8, 8, 8]  # not 10,10,10,2
    sel = tuple(ev.names[1::3])
    got = ev.val_logits(sel)
    ref_model = copy.deepcopy(supernet)
    set_selection(ref_model, sel)
    merge(ref_model)
    ref_model.eval()  # the rest stays in eval mode: no dropout, no sampled gates
    for m in ref_model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
    matches_reference(got, ref_model, ev, supernet, state, atol=1e-5)
    # the three sources of statistics give three different scorings of the same selection
    other = {s: SupernetEvaluator(copy.deepcopy(supernet), task, batch_size=10, bn_stats=s,
                                  bn_batches=2, bn_batch_size=16, prefix_cache_mb=0)
             for s in ("train", "supernet")}
    scores = {ev.scores(sel)["loglik"], *(e.scores(sel)["loglik"] for e in other.values())}
    assert len(scores) == 3
    with pytest.raises(ValueError, match="bn_stats 'batch' is not one of train, val, supernet"):
        SupernetEvaluator(supernet, task, bn_stats="batch")


def test_val_statistics_from_a_sample_of_each_batch():
    """bn_clips=k: every BatchNorm normalises a whole validation batch by the biased
    statistics of its first k clips (checked against a BatchNorm written out by hand),
    the split is shuffled so those clips are a sample of it, and with k at least the
    batch size the scores are those of training-mode BatchNorm."""
    from swr.fold import merge, unmerge
    from swr.reparam import set_selection

    task = tiny_audio_task(n_classes=4, per_class=24)
    # stored sorted by class: unshuffled, the first clips of a batch would be one class
    order = torch.argsort(task.val.tensors[1], stable=True)
    task.val = tensor_split(task.val.tensors[0][order], task.val.tensors[1][order])
    supernet = trained_looking_supernet("bcresnet-1", task)
    state = {k: v.clone() for k, v in supernet.state_dict().items()}
    ev = SupernetEvaluator(supernet, task, batch_size=16, bn_clips=3, prefix_cache_mb=0)
    ys = torch.cat([y for _, y in ev._val])
    assert torch.equal(ys.sort().values, task.val.tensors[1].sort().values)  # a permutation
    assert all(len(set(y.tolist())) > 2 for _, y in ev._val)  # sorted: 2 classes a batch
    sel = tuple(ev.names[::3])
    got = ev.val_logits(sel)

    def by_hand(m, args):
        x = args[0]
        head = x[:3]
        mean = head.mean(dim=(0, 2, 3), keepdim=True)
        var = ((head - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        w, b = m.weight.view(1, -1, 1, 1), m.bias.view(1, -1, 1, 1)
        return ((x - mean) / torch.sqrt(var + m.eps) * w + b,)

    ref_model = copy.deepcopy(supernet).eval()
    set_selection(ref_model, sel)
    merge(ref_model)
    bns = [m for m in ref_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:  # replace each BatchNorm by the hand-written one: identity after it
        m.register_forward_pre_hook(by_hand)
        m.forward = lambda x: x
    matches_reference(got, ref_model, ev, supernet, state, atol=1e-4)
    whole = SupernetEvaluator(copy.deepcopy(supernet), task, batch_size=16, prefix_cache_mb=0)
    big = SupernetEvaluator(copy.deepcopy(supernet), task, batch_size=16, bn_clips=16,
                            prefix_cache_mb=0)
    a, b = whole.scores(sel), big.scores(sel)
    assert a["accuracy"] == b["accuracy"] and a["loglik"] == pytest.approx(b["loglik"], abs=1e-5)
    assert ev.scores(sel)["loglik"] != pytest.approx(a["loglik"], abs=1e-5)
    with pytest.raises(ValueError, match="bn_clips must be at least 2"):
        SupernetEvaluator(supernet, task, bn_clips=1)
