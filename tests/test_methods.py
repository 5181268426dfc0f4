"""The PETL baselines: each trains only what it declares, counts it, keeps its budget
and folds exactly (or reports its extra inference cost)."""

import copy
import dataclasses

import pytest
import timm
import torch
from torch import nn

from swr.errors import BudgetError, SwrError
from swr.flops import count_flops
from swr.fold import same_architecture
from swr.methods import METHODS, Method, get_method, register_method, run_method
from swr.methods.lora import lora_targets
from swr.methods.runner import stored_bytes
from swr.methods.taps import scored_layers
from swr.methods.two_stage import channel_layers
from swr.reparam import candidates, head_prefix, norm_modules
from swr.tasks.backbones import create_backbone
from swr.tasks.base import Task, tensor_split
from swr.train import TrainConfig, recalibrate_batchnorm

CFG = TrainConfig(epochs=1, lr=1e-2, batch_size=8, progress=False, device="cpu")


def _task(shape, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(n):
        return tensor_split(torch.randn(n, *shape, generator=g), torch.arange(n) % 3)

    # 10 validation examples: the fewest a search scores on (swr.selection.MIN_VAL_EXAMPLES)
    return Task("toy", "image", ["a", "b", "c"], split(8), split(10), split(4), shape,
                shift_test=split(2))


@pytest.fixture(scope="module")
def families():
    """(base model, task) per backbone family; built once, never modified by the tests."""
    torch.manual_seed(0)
    # 24 frames instead of a clip's 101: BC-ResNet runs on any length, and CPU time
    # in its dilated depthwise convolutions grows with it.
    bc_task = _task((1, 40, 24))
    bc = create_backbone("bcresnet-1", num_classes=5)
    # Fresh BatchNorm statistics make the random network's outputs depend on its
    # weights, so the fold comparisons below are not vacuous.
    recalibrate_batchnorm(bc, bc_task.train, n_batches=1, batch_size=8)
    img_task = _task((3, 32, 32))
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5)
    resnet = timm.create_model("resnet18", num_classes=5)
    recalibrate_batchnorm(resnet, img_task.train, n_batches=1, batch_size=8)
    return {"bc": (bc.eval(), bc_task), "vit": (vit.eval(), img_task),
            "resnet": (resnet.eval(), img_task)}


def _reference(base, task):
    ref = copy.deepcopy(base).eval()
    ref.reset_classifier(task.num_classes)
    return ref


def _backbone_changes(folded, reference) -> dict[str, torch.Tensor]:
    """Per state-dict key outside the head: a bool mask of the elements that differ."""
    head = head_prefix(reference) + "."
    a, b = folded.state_dict(), reference.state_dict()
    return {k: (a[k] != b[k]) for k in b if not k.startswith(head) and not torch.equal(a[k], b[k])}


def _module_of(key: str) -> str:
    return key.rpartition(".")[0]


def _may_change(method: str, key: str, norms: tuple[str, ...], layers: set[str]) -> bool:
    """Whether ``method`` may change state-dict entry ``key`` of the base backbone."""
    in_norm, in_layer = key.startswith(norms), _module_of(key) in layers
    return {
        "full": True,
        "wise-ft": True,
        "linear": False,
        "bitfit": key.endswith(".bias"),  # a module's own bias, norm shifts included
        "norm": in_norm,  # affines and running statistics
        "ssf": in_layer,
        "lora": in_layer,
        "taps": in_layer or in_norm,
        "two-stage": in_layer or in_norm,
    }[method]


# (method, family, budget, knobs). Budgets are chosen to exercise each method's fitting:
# SSF on the ViT (41856 natural) must drop layers to fit 20000.
CASES = [
    ("linear", "bc", 3000, {}),
    ("full", "bc", 3000, {}),
    ("bitfit", "bc", 3000, {}),
    ("norm", "bc", 3000, {}),
    ("ssf", "bc", 3000, {}),
    ("lora", "bc", 3000, {}),
    ("adapter-par", "bc", 3000, {}),
    ("adapter-seq", "bc", 3000, {}),
    ("taps", "bc", 3000, {}),
    ("two-stage", "bc", 3000, {}),
    ("wise-ft", "bc", 3000, {"alphas": [0.5, 1.0]}),
    ("ssf", "vit", 20000, {}),
    ("lora", "vit", 40000, {"rank": 1}),
    ("adapter-seq", "vit", 20000, {}),
    ("taps", "vit", 40000, {"retrain_epochs": 0}),
    ("two-stage", "vit", 20000, {}),
    ("vpt-shallow", "vit", 5000, {}),
    ("vpt-deep", "vit", 5000, {}),
    ("adapter-par", "resnet", 60000, {}),
    ("lora", "resnet", 100000, {}),
]


@pytest.mark.parametrize("name,family,budget,knobs", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_method_trains_counts_and_folds(families, name, family, budget, knobs):
    base, task = families[family]
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    method = get_method(name, **knobs)
    torch.manual_seed(0)
    model = method.prepare(copy.deepcopy(base), task, budget)
    head = {id(p) for p in model.get_classifier().parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    declared = {id(p) for p in method.trainable_parameters(model)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == declared
    declared_backbone = sum(p.numel() for p in method.trainable_parameters(model)
                            if id(p) not in head)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    method.fit(model, task, CFG)
    updated = method.updated_params(model)

    # The base model the method copied from is never touched.
    assert all(torch.equal(v, base_state[k]) for k, v in base.state_dict().items())
    if method.respects_budget:
        assert 0 < updated <= budget
    # The updated-parameter count, per method (see each method's docstring). TAPS and
    # two-stage train more than they keep; they are counted on the folded model below.
    if name not in ("taps", "two-stage"):
        assert updated == declared_backbone

    ref = _reference(base, task)
    x = torch.randn(4, *task.input_shape, generator=torch.Generator().manual_seed(5))
    if method.foldable:
        folded = method.fold(model)
        assert same_architecture(folded, ref)
        with torch.no_grad():
            y, y_folded = model(x), folded(x)
        assert (y - y_folded).abs().max() <= 1e-5
        changes = _backbone_changes(folded, ref)
        norms = tuple(n + "." for n in norm_modules(ref))
        layers = {c.name for c in candidates(ref)}
        for key in changes:  # only the method's own mechanism moved the backbone
            assert _may_change(name, key, norms, layers), key
        assert bool(changes) == (name != "linear"), "training must move the backbone (only)"
        if name == "lora":  # depthwise/grouped convs are left out (peft cannot merge them)
            kinds = {c.name: c.kind for c in candidates(ref)}
            assert all(kinds[_module_of(k)] in ("linear", "conv1d", "conv2d")
                       for k in changes if _module_of(k) in kinds)
        if name == "taps":
            open_layers = {n for n, m in scored_layers(model).items() if m.is_open}
            weight_changes = {k: m for k, m in changes.items() if not k.startswith(norms)}
            assert {_module_of(k) for k in weight_changes} <= open_layers
            assert sum(int(m.sum()) for m in weight_changes.values()) <= updated
            # the open deltas and the task norms when they fit (on the BC-ResNet; the ViT's
            # 9600 leave less than its cheapest layer of 40000): both count in it
            norm_count = sum(p.numel() for n in norm_modules(model)
                             for p in model.get_submodule(n).parameters())
            assert method.norms_trained is (family == "bc")
            norm_count *= method.norms_trained
            assert method.norm_params(model) == norm_count
            assert updated == norm_count + sum(m.cost for n, m in scored_layers(model).items()
                                               if n in open_layers)
        if name == "two-stage":
            masked = channel_layers(model)
            norm_count = sum(p.numel() for n in norm_modules(model)
                             for p in model.get_submodule(n).parameters())
            rows = sum(m.tuned_params for m in masked.values())
            assert updated == norm_count + rows
            for key, mask in changes.items():
                if key.startswith(norms):
                    continue
                layer = masked[_module_of(key)]
                changed_rows = mask.flatten(1).any(1).nonzero().flatten()
                assert set(changed_rows.tolist()) <= set(layer.channels.tolist())
    else:
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and changed <= trainable
        assert count_flops(model, x[:1]) > count_flops(ref, x[:1])
    assert stored_bytes(method.stored_tensors(model)) > 0


def test_run_method_row_foldable_and_not(families):
    base, task = families["bc"]
    state = {k: v.clone() for k, v in base.state_dict().items()}
    row = run_method("taps", base, task, 3000, CFG)
    assert row["method"] == "taps" and row["foldable"] and row["within_budget"]
    assert row["fold_max_abs_diff"] <= 1e-5 and row["extra_flops"] == 0
    assert row["shift_acc"] is not None and 0 <= row["test_acc"] <= 1
    assert row["norm_params"] > 0 and row["head_params"] == 32 * 3 + 3
    assert row["settings"]["penalty"] == 1.0
    row = run_method("adapter-par", base, task, 3000, CFG, width=2)
    assert not row["foldable"] and row["fold_max_abs_diff"] is None
    assert row["extra_flops"] > 0 and row["settings"] == {"width": 2}
    assert row["within_budget"] and row["updated_params"] <= 3000
    # Methods that ignore the budget say whether they happen to fit it.
    row = run_method("full", base, task, 3000, CFG)
    assert row["respects_budget"] is False and row["within_budget"] is False
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def test_stored_bytes_is_the_safetensors_size(families):
    base, task = families["bc"]
    method = get_method("linear")
    model = method.prepare(copy.deepcopy(base), task, None)
    tensors = method.stored_tensors(model)
    assert set(tensors) == {"head/head.weight", "head/head.bias"}
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload < stored_bytes(tensors) < payload + 1024


def test_lora_merge_matches_unmerged_and_skips_depthwise(families):
    base, task = families["bc"]
    targets = lora_targets(base)
    kinds = {c.name: c.kind for c in candidates(base)}
    assert targets and all(kinds[t] in ("linear", "conv1d", "conv2d") for t in targets)
    assert any(k.startswith("dw") for k in kinds.values())
    method = get_method("lora", rank=2)
    model = method.prepare(copy.deepcopy(base), task, None)
    assert method.settings() == {"rank": 2, "alpha": 2.0}
    with torch.no_grad():  # a non-zero update, so merging has something to match
        for p in method.trainable_parameters(model):
            p.normal_(0, 0.1)
    x = torch.randn(4, *task.input_shape)
    folded = method.fold(model.eval())
    with torch.no_grad():
        y, y_base = model(x), folded(x)
    assert (y - y_base).abs().max() <= 1e-5
    assert same_architecture(folded, _reference(base, task))


def test_taps_finalize_keeps_highest_scores_within_budget(families):
    base, task = families["bc"]
    method = get_method("taps")
    model = method.prepare(copy.deepcopy(base), task, 1000)
    layers = scored_layers(model)
    with torch.no_grad():  # distinct scores; one layer below the threshold
        for i, layer in enumerate(layers.values()):
            layer.score.fill_(1.0 + i / 100)
        first = next(iter(layers.values()))
        first.score.fill_(0.05)
    assert method.finalize(model)  # the budget closed gates the scores had open
    kept = [n for n, m in layers.items() if m.is_open]
    assert first.gate == 0.0 and kept
    assert sum(layers[n].cost for n in kept) <= 1000
    # greedy by score: every closed layer above threshold either scored lower than
    # a kept one or did not fit what was left
    best_closed = max((m for n, m in layers.items() if n not in kept and m is not first),
                      key=lambda m: float(m.score.detach()))
    assert any(float(layers[n].score.detach()) > float(best_closed.score.detach())
               for n in kept)


def test_taps_penalty_pushes_scores_down(families):
    base, task = families["bc"]
    method = get_method("taps", penalty=10.0, retrain_epochs=0)
    model = method.prepare(copy.deepcopy(base), task, None)
    method.fit(model, task, CFG)
    assert all(float(m.score.detach()) < 1.0 for m in scored_layers(model).values())


def test_vpt_refuses_cnn_with_reason(families):
    base, task = families["resnet"]
    method = get_method("vpt-deep")
    assert not method.supports(base)
    assert "VisionTransformer" in method.unsupported_reason(base)
    with pytest.raises(SwrError, match="VisionTransformer"):
        run_method("vpt-shallow", base, task, 5000, CFG)
    assert method.supports(families["vit"][0])


def test_unknown_names_knobs_and_budgets_are_clear_errors(families):
    with pytest.raises(SwrError, match="known methods: .*lora"):
        get_method("lorra")
    with pytest.raises(SwrError, match="no option ranks.*rank"):
        get_method("lora", ranks=4)
    base, task = families["bc"]
    with pytest.raises(BudgetError, match="over the budget"):
        get_method("lora").prepare(copy.deepcopy(base), task, 10)
    with pytest.raises(BudgetError, match="rank=64"):
        get_method("lora", rank=64).prepare(copy.deepcopy(base), task, 3000)
    with pytest.raises(SwrError, match="budget"):
        get_method("adapter-par").prepare(copy.deepcopy(base), task, None)
    with pytest.raises(BudgetError, match="norm parameters"):
        get_method("two-stage").prepare(copy.deepcopy(base), task, 100)


class _Stub(Method):
    """A method that trains nothing: what the registry tests register."""

    def prepare(self, model, task, budget_params):
        return model

    def trainable_parameters(self, model):
        return []

    def updated_params(self, model):
        return 0

    def stored_tensors(self, model):
        return {}


def test_register_method_adds_a_name():
    class Probe(_Stub):
        name = "probe-test"

    register_method("probe-test", Probe)
    try:
        assert isinstance(get_method("probe-test"), Probe)
    finally:
        del METHODS["probe-test"]
    assert {"linear", "full", "bitfit", "norm", "ssf", "lora", "adapter-par", "adapter-seq",
            "taps", "two-stage", "vpt-shallow", "vpt-deep"} <= set(METHODS)


def test_register_method_decorates_a_class_under_its_name():
    """``@register_method`` registers a Method class where it is defined, by its ``name``;
    the built-in methods are registered that way, in the order users see them."""
    @register_method
    class Decorated(_Stub):
        name = "decorated-test"

    try:
        assert METHODS["decorated-test"] is Decorated
        assert isinstance(get_method("decorated-test"), Decorated)
    finally:
        del METHODS["decorated-test"]
    assert list(METHODS)[:15] == ["linear", "full", "bitfit", "norm", "ssf", "lora",
                                  "adapter-par", "adapter-seq", "taps", "two-stage",
                                  "vpt-shallow", "vpt-deep", "wise-ft", "swr", "swr-deltas"]
    assert all(METHODS[n].name == n for n in METHODS)
    with pytest.raises(ValueError, match="non-empty"):
        register_method(" spaced ", Decorated)


def test_a_searcher_registers_swr_with_it():
    """Registering a searcher makes SWR with it a method, ``swr-<searcher>``: the one place
    those methods come from (no import has to run a registration of its own)."""
    from swr.methods import SWR
    from swr.policies import SEARCHERS, register_searcher

    assert {f"swr-{n}" for n in SEARCHERS if n != SWR.selector} <= set(METHODS)
    assert "swr-pg" not in METHODS  # SWR's default searcher is method "swr" itself
    register_searcher("probe-searcher", lambda settings: None, "a test searcher")
    try:
        method = get_method("swr-probe-searcher")
        assert isinstance(method, SWR) and method.selector == "probe-searcher"
        assert method.search_settings()["policy"] == "probe-searcher"
    finally:
        del SEARCHERS["probe-searcher"], METHODS["swr-probe-searcher"]


def test_count_flops_counts_multiply_accumulates_twice():
    assert count_flops(nn.Linear(10, 5), torch.randn(1, 10)) == 2 * 10 * 5
    conv = nn.Conv2d(3, 4, 3, padding=1)
    assert count_flops(conv, torch.randn(1, 3, 8, 8)) == 2 * 3 * 9 * 4 * 64


class _CheapestFirst:
    """A searcher for accounting tests: the cheapest layers that fit, no scoring."""

    name = "cheapest"

    def describe(self) -> dict:
        return {"policy": self.name, "seed": 0}

    def __call__(self, problem):
        from swr.selection import SearchResult

        chosen, left = [], problem.budget_params
        for cost, name in sorted(zip(problem.costs, problem.names)):
            if cost <= left:
                chosen.append(name)
                left -= cost
        return SearchResult(layers=tuple(chosen), score=0.0, evaluations=1)


def _trained_outside_head(model) -> int:
    """Elements of the parameters that train (requires_grad) outside the head; a two-stage
    channel delta counts its chosen rows only (the others are masked out of the forward)."""
    head = {id(p) for p in model.get_classifier().parameters()}
    rows = {id(m.delta): m.tuned_params for m in channel_layers(model).values()}
    return sum(rows.get(id(p), p.numel()) for p in model.parameters()
               if p.requires_grad and id(p) not in head)


# (family, budget, knobs) per registered method for the accounting test; the SWR family
# (any swr* name another test module registered too) runs on the BC-ResNet with its norms
# (2416 parameters) fitting 3000 and not 1000. TAPS retrains once after its budget cut, so
# that what trains last is what it keeps.
ACCOUNTING = {
    "linear": ("bc", None, {}), "full": ("bc", None, {}), "bitfit": ("bc", None, {}),
    "norm": ("bc", None, {}), "ssf": ("bc", 3000, {}), "lora": ("bc", 3000, {}),
    "adapter-par": ("bc", 3000, {}), "adapter-seq": ("bc", 3000, {}),
    "taps": ("bc", 3000, {"retrain_epochs": 1}), "two-stage": ("bc", 3000, {}),
    "wise-ft": ("bc", None, {"alphas": [0.5]}), "vpt-shallow": ("vit", 5000, {}),
    "vpt-deep": ("vit", 5000, {}),
}
#: Methods whose trained set is final after ``prepare`` (the others change it in ``fit``).
PHASED = ("taps", "two-stage", "wise-ft")


def _accounting_cases():
    cases = []
    for name in sorted(METHODS):
        if name.startswith("swr"):
            cases += [(name, "bc", 3000, {}), (name, "bc", 1000, {})]
        else:
            cases.append((name, *ACCOUNTING.get(name, ("bc", 3000, {}))))
    return cases


@pytest.mark.parametrize("name,family,budget,knobs", _accounting_cases(),
                         ids=[f"{c[0]}-{c[2]}" for c in _accounting_cases()])
def test_every_method_reports_what_it_trains_outside_the_head(families, tmp_path, name, family,
                                                              budget, knobs):
    """updated_params is one quantity for every method: the parameters that train, less the
    head; a method that respects the budget keeps that quantity within it."""
    assert name in ACCOUNTING or name.startswith("swr"), f"add {name!r} to ACCOUNTING"
    base, task = families[family]
    method = get_method(name, **knobs)
    if method.search_settings() is not None:  # SWR and its variants: a searcher, stage 1 short
        method.searcher, method.supernet_epochs, method.device = _CheapestFirst(), 1, "cpu"
        method.out = str(tmp_path)
    torch.manual_seed(0)
    model = method.prepare(copy.deepcopy(base), task, budget)
    if name not in PHASED:
        assert method.updated_params(model) == _trained_outside_head(model)
    method.fit(model, task, CFG)
    updated = method.updated_params(model)
    assert updated == _trained_outside_head(model)
    assert method.norm_params(model) <= updated
    if method.respects_budget and getattr(method, "norms", "auto") != "free":
        assert updated <= budget
    if name.startswith("swr"):
        norm_count = sum(p.numel() for m in norm_modules(model).values() for p in m.parameters())
        trains = name != "swr-deltas" and budget >= norm_count
        assert method.norms_trained is trains and (method.norm_params(model) > 0) is trains
        assert method.norms_accounting() == ("none" if name == "swr-deltas"
                                             else "auto" if trains else "auto:none")


def test_swr_deltas_only_keeps_the_base_norms(families, tmp_path):
    """Without task norms, SWR's model keeps the base's norm affines and BatchNorm
    statistics (not the ones stage 1 trained), and only the selected deltas move."""
    base, task = families["bc"]
    method = get_method("swr-deltas", supernet_epochs=1, device="cpu", out=str(tmp_path))
    method.searcher = _CheapestFirst()
    model = method.prepare(copy.deepcopy(base), task, 3000)
    method.fit(model, task, CFG)
    base_norms, norms = norm_modules(base), norm_modules(model)
    assert set(base_norms) == set(norms)
    for name, m in norms.items():
        for key, t in m.state_dict().items():
            assert torch.equal(t, base_norms[name].state_dict()[key]), f"{name}.{key}"
    assert method.norm_params(model) == 0 and method.norms_accounting() == "none"
    with pytest.raises(SwrError, match="norms=none"):
        get_method("swr-deltas", norms="free")
    with pytest.raises(SwrError, match="norms"):
        get_method("swr", norms="sometimes")


def test_swr_stage_3_never_ends_below_its_linear_probe_on_validation():
    """LP-FT: the head is fitted on frozen features first; when no epoch of the deltas'
    training beats that probe on validation (a learning rate that wrecks the model),
    the probe is what SWR keeps: zero deltas, the base's norms, the probe's head."""
    from swr.methods.swr import SWR
    from swr.reparam import reparam_layers

    from fixtures import tiny_audio_task

    torch.manual_seed(0)
    base = create_backbone("bcresnet-1", num_classes=4).eval()
    task = tiny_audio_task(4, per_class=24, seed=5)
    layers = [c.name for c in candidates(base)][-3:]
    method = SWR(selection=layers, norms_trained=True, init="probe", seed=0, probe_lr=5e-2)
    model = method.prepare(copy.deepcopy(base), task, budget_params=10**6)
    cfg = TrainConfig(epochs=2, lr=50.0, batch_size=32, device="cpu", progress=False)
    result = method.fit(model, task, cfg)
    probe = result.history[0]
    assert probe["phase"] == "probe" and result.best_epoch == 0
    assert result.val_acc == probe["val_acc"] >= max(h["val_acc"] for h in result.history[1:])
    assert all(float(layer.delta.detach().abs().max()) == 0 for layer in reparam_layers(model).values())
    for name, m in norm_modules(base).items():
        assert torch.equal(model.get_submodule(name).running_var, m.running_var), name
    # with a sane rate the deltas train and are kept when they beat the probe on validation
    method = SWR(selection=layers, norms_trained=True, init="probe", seed=0, probe_lr=5e-2)
    model = method.prepare(copy.deepcopy(base), task, budget_params=10**6)
    result = method.fit(model, task, TrainConfig(epochs=3, lr=2e-2, batch_size=32,
                                                 device="cpu", progress=False))
    assert result.val_acc >= result.history[0]["val_acc"]


def test_swr_probe_is_the_linear_probes_own_solution():
    """Stage 3's probe starts from the head the linear probe draws (same seed, same
    rate), though stages 1 and 2 drew from the generator before it: when no epoch beats
    the probe SWR ends with the linear probe's own head, and otherwise above it on
    validation. SWR cannot score below its own subset there."""
    from swr.methods.linear import LinearProbe
    from swr.methods.swr import SWR
    from swr.app.search import attach_searcher

    from fixtures import tiny_audio_task

    torch.manual_seed(0)
    base = create_backbone("bcresnet-1", num_classes=4).eval()
    task = tiny_audio_task(4, per_class=24, seed=5)
    budget = sum(c.params for c in candidates(base)) // 20
    cfg = TrainConfig(epochs=2, lr=5e-2, batch_size=32, device="cpu", progress=False, seed=3)

    def fitted(method, budget_params, lr):  # as the runner runs a method: seeded, then prepared
        torch.manual_seed(cfg.seed)
        model = method.prepare(copy.deepcopy(base), task, budget_params)
        return model, method.fit(model, task, dataclasses.replace(cfg, lr=lr))

    def swr():
        method = SWR(selector="random", evaluations=3, supernet_epochs=1, norms="none",
                     seed=3, probe_lr=5e-2)
        attach_searcher(method)
        return method

    probe, linear = fitted(LinearProbe(), None, 5e-2)
    model, wrecked = fitted(swr(), budget, 50.0)
    assert wrecked.best_epoch == 0 and wrecked.val_acc == linear.val_acc
    for key, value in probe.get_classifier().state_dict().items():
        assert torch.equal(model.get_classifier().state_dict()[key], value), key
    assert fitted(swr(), budget, 2e-2)[1].val_acc >= linear.val_acc
