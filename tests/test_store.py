"""Many tasks on one base: the task store, in-place switching, swr predict, and
`swr finetune --method` (any foldable method trained and exported outside bench)."""

import copy
import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import v2

import swr.policies  # noqa: F401  (registers swr-knapsack)
import swr.tasks
from swr.app.cli import main
from swr.delta import apply_task_delta, read_task_delta
from swr.errors import ForeignDeltaError, SwrError
from swr.app.bench import finetune_method
from swr.export import delta_from_folded, write_task_delta
from swr.source import BaseSpec
from swr.store import TaskStore, create_or_open
from swr.tasks.backbones import create_backbone

from fixtures import tiny_audio_task, write_clip

BACKBONE = "bcresnet-1"


def save_weights(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory):
    """A bcresnet-1 base file and three tasks trained on it by three methods (one epoch)."""
    tmp = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    weights = save_weights(create_backbone(BACKBONE, num_classes=6), tmp / "base.safetensors")
    tasks = {"a": tiny_audio_task(3, name="a", seed=1), "b": tiny_audio_task(4, name="b", seed=2),
             "c": tiny_audio_task(5, name="c", seed=3)}
    methods = {"a": ("lora", "20%", {}), "b": ("norm", None, {}),
               "c": ("swr-knapsack", "5%", {"evaluations": 3, "supernet_epochs": 1})}
    spec = BaseSpec(backbone=BACKBONE, weights=str(weights))
    mp = pytest.MonkeyPatch()
    mp.setattr(swr.tasks, "get_task", lambda s, **kw: tasks[s])
    # module-scoped: the per-test cache fixture has not run yet; keep the supernet cache here
    mp.setenv("SWR_CACHE", str(tmp / "cache"))
    try:
        runs = {name: finetune_method(method, name, spec, tmp / name, budget=budget, epochs=1,
                                      device="cpu", progress=False, knobs=knobs)
                for name, (method, budget, knobs) in methods.items()}
    finally:
        mp.undo()
    return tmp, weights, tasks, runs


def test_finetune_method_writes_delta_metrics_and_deployable_model(three_tasks):
    tmp, weights, _, runs = three_tasks
    for name, method in (("a", "lora"), ("b", "norm"), ("c", "swr-knapsack")):
        out = tmp / name
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["method"] == method and metrics["foldable"] is True
        assert metrics["delta_bytes"] == (out / "task_delta.safetensors").stat().st_size
        assert metrics["base"]["weights"] == str(weights.resolve())
        # the deployed model is base + delta, bit for bit
        rebuilt = apply_task_delta(create_backbone(BACKBONE, weights=weights),
                                   out / "task_delta.safetensors")
        saved = create_backbone(BACKBONE, weights=out / "model.safetensors")
        for (k, a), (_, b) in zip(rebuilt.state_dict().items(), saved.state_dict().items()):
            assert torch.equal(a, b), f"{name}: {k}"
    # SWR's delta rebuilds its folded model exactly; the others within rounding
    assert runs["c"]["rebuild_max_abs_diff"] == 0.0
    assert runs["a"]["rebuild_max_abs_diff"] <= 1e-5
    assert runs["a"]["within_budget"] is True


def test_store_switches_in_place_and_matches_each_folded_model(three_tasks, tmp_path):
    tmp, weights, tasks, _ = three_tasks
    root = tmp_path / "store"
    store = create_or_open(root, BaseSpec(backbone=BACKBONE, weights=str(weights)))
    for name in "abc":
        store.add(tmp / name / "task_delta.safetensors", name=name)
    assert [r["name"] for r in TaskStore(root).list()] == ["a", "b", "c"]
    assert [r["classes"] for r in store.list()] == [3, 4, 5]

    model = TaskStore(root).load()
    inner = model.model
    conv = dict(inner.named_parameters())
    pointers = {k: p.data_ptr() for k, p in conv.items() if "head" not in k}
    x = torch.cat([tasks[n].test.tensors[0][:4] for n in "abc"])
    base_out = inner.forward_features(x).clone()
    folded = {n: create_backbone(BACKBONE, weights=tmp / n / "model.safetensors").eval()
              for n in "abc"}
    with torch.no_grad():
        for name in ["a", "b", "c", "a", "c", "b"]:  # every switch, both directions
            model.set_task(name)
            assert model.active_task == name and model.model is inner
            assert torch.equal(model(x), folded[name](x)), name
        model.set_task(None)
        assert torch.equal(inner.forward_features(x), base_out)  # the base, bit for bit
    # in place: the backbone's parameters are the same tensors throughout
    assert {k: p.data_ptr() for k, p in inner.named_parameters() if k in pointers} == pointers

    store.remove("b")
    assert [r["name"] for r in TaskStore(root).list()] == ["a", "c"]
    assert not (root / "tasks" / "b.safetensors").exists()
    with pytest.raises(SwrError, match="no task 'b'"):
        TaskStore(root).load().set_task("b")
    with pytest.raises(SwrError, match="already in"):
        store.add(tmp / "a" / "task_delta.safetensors", name="a")
    # a delta made for other base weights is refused
    torch.manual_seed(1)
    other_base = create_backbone(BACKBONE, num_classes=6).eval()
    other = copy.deepcopy(other_base)
    other.reset_classifier(3)
    write_task_delta(delta_from_folded(other_base, other), tmp_path / "foreign.safetensors",
                     base=other_base, backbone=BACKBONE)
    with pytest.raises(ForeignDeltaError, match="other|made for"):
        store.add(tmp_path / "foreign.safetensors", name="foreign")


def test_store_and_predict_cli_on_wav_files(three_tasks, tmp_path, capsys):
    tmp, weights, tasks, _ = three_tasks
    root = tmp_path / "kws"
    base = ["--backbone", BACKBONE, "--weights", str(weights)]
    assert main(["store", "add", str(root), *base, "--delta",
                 str(tmp / "a" / "task_delta.safetensors"), "--name", "a"]) == 0
    assert main(["store", "add", str(root), "--delta", str(tmp / "b" / "task_delta.safetensors"),
                 "--name", "b", "--classes", "yes,no,up,down"]) == 0
    capsys.readouterr()
    assert main(["store", "list", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in listed["tasks"]] == ["a", "b"]
    wavs = [str(write_clip(tmp_path / f"clip{i}.wav", i)) for i in range(2)]
    assert main(["predict", "--store", str(root), "--task", "b", *wavs, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["file"] for p in out["predictions"]] == wavs
    # the probabilities are the folded task model's on the log-mel of each clip
    from swr.tasks.audio import read_audio
    from swr.tasks.features import LogMel

    folded = create_backbone(BACKBONE, weights=tmp / "b" / "model.safetensors").eval()
    for p, wav in zip(out["predictions"], wavs):
        with torch.no_grad():
            probs = torch.softmax(folded(LogMel()(read_audio(wav))), -1)[0]
        assert p["label"] == ["yes", "no", "up", "down"][int(probs.argmax())]
        assert p["probability"] == pytest.approx(float(probs.max()), abs=1e-6)
        assert [t["probability"] for t in p["top"]] == sorted(
            (t["probability"] for t in p["top"]), reverse=True)
    assert main(["predict", "--store", str(root), "--task", "a", wavs[0]]) == 0
    assert wavs[0] in capsys.readouterr().out
    # bad input: one line, exit 2
    assert main(["predict", "--store", str(root), "--task", "nope", wavs[0]]) == 2
    assert "no task 'nope'" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["predict", "--store", str(root), "--task", "a", str(tmp_path / "x.png")]) == 2
    assert "audio input" in capsys.readouterr().err
    assert main(["store", "remove", str(root), "--name", "a"]) == 0


def test_predict_on_image_files_uses_the_tasks_preprocessing(tmp_path, capsys):
    torch.manual_seed(0)
    base = timm.create_model("resnet10t", num_classes=10).eval()
    weights = save_weights(base, tmp_path / "r10t.safetensors")
    task_model = copy.deepcopy(base)
    task_model.reset_classifier(3)
    with torch.no_grad():
        task_model.conv1[0].weight.mul_(1.5)  # a changed backbone layer, beside the head
    pre = {"modality": "image", "image_size": 40, "crop_pct": 0.875, "interpolation": "bicubic",
           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    delta = tmp_path / "task_delta.safetensors"
    write_task_delta(delta_from_folded(base, task_model), delta, base=base,
                     backbone="timm:resnet10t", task="shapes",
                     extra={"classes": ["circle", "square", "star"], "preprocess": pre})
    tensors, _ = read_task_delta(delta)
    # the changed layer, the head and (always) the task's whole norm state
    assert {k for k in tensors if not k.startswith("norm/")} == \
        {"delta/conv1.0.weight", "head/fc.weight", "head/fc.bias"}
    assert "norm/bn1.running_var" in tensors
    root = tmp_path / "imgs"
    assert main(["store", "add", str(root), "--backbone", "timm:resnet10t", "--weights",
                 str(weights), "--delta", str(delta)]) == 0
    files = []
    for i, rgb in enumerate([(250, 10, 10), (10, 200, 30)]):
        files.append(str(tmp_path / f"img{i}.jpg"))
        Image.new("RGB", (64 + 8 * i, 48), rgb).save(files[-1])
    capsys.readouterr()
    assert main(["predict", "--store", str(root), "--task", "shapes", *files, "--json",
                 "--top", "2"]) == 0
    preds = json.loads(capsys.readouterr().out)["predictions"]
    rebuilt = apply_task_delta(create_backbone("timm:resnet10t", weights=weights), delta).eval()
    bicubic = v2.InterpolationMode.BICUBIC
    tf = v2.Compose([v2.ToImage(), v2.Resize(int(40 / 0.875), interpolation=bicubic),
                     v2.CenterCrop(40), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(pre["mean"], pre["std"]), v2.ToPureTensor()])
    for p, f in zip(preds, files):
        with torch.no_grad():
            probs = torch.softmax(rebuilt(tf(Image.open(f).convert("RGB")).unsqueeze(0)), -1)[0]
        assert p["label"] == ["circle", "square", "star"][int(probs.argmax())]
        assert p["probability"] == pytest.approx(float(probs.max()), abs=1e-6)
        assert len(p["top"]) == 2
    # the new head is in the model's (eval) mode, and the base head comes back on unmerge
    model = TaskStore(root).load()
    base_fc = model.model.fc
    model.set_task("shapes")
    assert not any(m.training for m in model.model.modules())
    assert model.model.fc.out_features == 3 and model.model.num_classes == 3
    model.set_task(None)
    assert model.model.fc is base_fc and model.model.num_classes == 10


def test_a_delta_that_changes_only_a_layers_bias_applies(tmp_path):
    """BitFit changes the bias of a gated layer and not its weight (regnety's
    squeeze-excitation convolutions have biases): its task delta holds that bias alone,
    which validates and applies (swr bench stopped on it before)."""
    torch.manual_seed(0)
    base = timm.create_model("regnety_002", num_classes=5).eval()
    task_model = copy.deepcopy(base)
    with torch.no_grad():
        task_model.s1.b1.se.fc1.bias.add_(0.5)
    delta = tmp_path / "bias_only.safetensors"
    write_task_delta(delta_from_folded(base, task_model), delta, base=base,
                     backbone="timm:regnety_002")
    tensors, meta = read_task_delta(delta)
    assert [k for k in tensors if k.startswith("delta/")] == ["delta/s1.b1.se.fc1.bias"]
    assert meta["selection"] == ["s1.b1.se.fc1"]
    rebuilt = apply_task_delta(copy.deepcopy(base), delta, backbone="timm:regnety_002")
    want, have = task_model.state_dict(), rebuilt.state_dict()
    assert torch.allclose(have["s1.b1.se.fc1.bias"], want["s1.b1.se.fc1.bias"], atol=1e-6)
    assert not torch.allclose(have["s1.b1.se.fc1.bias"], base.state_dict()["s1.b1.se.fc1.bias"])
    assert all(torch.equal(have[k], want[k]) for k in want if k != "s1.b1.se.fc1.bias")


def test_finetune_method_cli_and_its_errors(tmp_path, monkeypatch, capsys):
    task = tiny_audio_task(3)
    monkeypatch.setattr(swr.tasks, "get_task", lambda spec, **kw: task)
    torch.manual_seed(0)
    weights = save_weights(create_backbone(BACKBONE, num_classes=6), tmp_path / "w.safetensors")
    base = ["--backbone", BACKBONE, "--weights", str(weights)]
    out = tmp_path / "bitfit"
    assert main(["finetune", "--method", "bitfit", "--task", "tiny", *base, "--epochs", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"task_delta.safetensors", "metrics.json",
                                               "model.safetensors", "history.json"}
    assert len(json.loads((out / "history.json").read_text())) == 1  # one epoch
    assert "bitfit: test acc" in capsys.readouterr().out
    cases = [
        (["--method", "lora", "--task", "tiny", *base], "needs --budget|budget"),
        (["--method", "vpt-shallow", "--task", "tiny", *base, "--budget", "5%"], "fold"),
        (["--method", "lora", *base, "--budget", "5%"], "needs --task"),
        (["--method", "magic", "--task", "tiny", *base], "unknown method"),
        (["--method", "lora", "--task", "tiny", "--budget", "5%"], "no base model"),
        (["--selection", str(tmp_path / "s.json"), "--task", "tiny"], "go with --method"),
    ]
    for args, message in cases:
        assert main(["finetune", *args, "--out", str(tmp_path / "x")]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and any(m in err for m in message.split("|")), err


def test_evaluate_scores_a_delta_a_folded_model_and_a_store_task_as_the_bench_did(
        three_tasks, tmp_path, monkeypatch):
    """swr evaluate on a run's task delta (on its base), on the model swr fold made of it,
    and on the same task in a store: the accuracy of the deployed model on the test split
    is the run's test accuracy, and metrics.json, confusion.csv and confusion.png say the
    same."""
    import csv

    from swr.deploy import fold_task
    from swr.app.evaluation import evaluate

    tmp, weights, tasks, runs = three_tasks
    monkeypatch.setattr(swr.tasks, "get_task", lambda s, **kw: tasks[s])
    spec = BaseSpec(backbone=BACKBONE, weights=str(weights))
    for name in ("a", "b", "c"):
        delta = tmp / name / "task_delta.safetensors"
        m = evaluate(tmp_path / f"eval-{name}", delta=str(delta), base=spec, device="cpu")
        assert m["task"] == name and m["split"] == "test"
        assert m["accuracy"] == pytest.approx(runs[name]["test_acc"], abs=1e-12), name
        fold_task(spec, delta, tmp_path / f"model-{name}")
        folded = evaluate(tmp_path / f"eval-model-{name}", model=str(tmp_path / f"model-{name}"),
                          device="cpu")
        assert folded["task"] == name and folded["classes"] == m["classes"]
        assert folded["accuracy"] == pytest.approx(runs[name]["test_acc"], abs=1e-12), name
        assert folded["per_class"] == m["per_class"]
        rows = list(csv.DictReader(open(tmp_path / f"eval-{name}" / "confusion.csv")))
        assert sum(int(r[r["true"]]) for r in rows) == round(m["accuracy"] * m["n"])
        assert (tmp_path / f"eval-{name}" / "confusion.png").stat().st_size > 1000
    store = create_or_open(tmp_path / "st", spec)
    store.add(tmp / "b" / "task_delta.safetensors", name="b")
    m = evaluate(tmp_path / "eval-store", store=str(tmp_path / "st"), name="b", device="cpu")
    assert m["accuracy"] == pytest.approx(runs["b"]["test_acc"], abs=1e-12)
    # per-class accuracies add up to the overall one
    per = m["per_class"]
    assert sum(v["accuracy"] * v["n"] for v in per.values()) == pytest.approx(
        m["accuracy"] * m["n"])
    with pytest.raises(SwrError, match="--name"):
        evaluate(tmp_path / "e2", store=str(tmp_path / "st"), device="cpu")
    with pytest.raises(SwrError, match="one model"):
        evaluate(tmp_path / "e3", model=str(tmp_path / "model-a"),
                 delta=str(tmp / "a" / "task_delta.safetensors"), device="cpu")
    with pytest.raises(SwrError, match="takes audio"):  # an image option on an audio model
        evaluate(tmp_path / "e4", model=str(tmp_path / "model-a"), device="cpu",
                 folder=str(tmp_path), data_override=swr.tasks.DataOverride(image_size=32))
    report = tmp_path / "model-a" / "fold.json"
    old = json.loads(report.read_text())
    report.write_text(json.dumps({k: v for k, v in old.items() if k != "data_config"}))
    with pytest.raises(SwrError, match="fold the model again"):
        evaluate(tmp_path / "e5", model=str(tmp_path / "model-a"), device="cpu")
