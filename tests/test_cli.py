import json

import pytest

from swr.app.cli import COMMANDS, main


def test_inspect_json_resnet18(capsys):
    assert main(["inspect", "--backbone", "timm:resnet18", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"layers", "total_params", "fold_check"} <= out.keys()
    assert out["total_params"] == 11_689_512
    assert all({"name", "kind", "params"} <= layer.keys() for layer in out["layers"])
    assert out["fold_check"]["max_abs_diff"] <= 1e-5 and out["fold_check"]["ok"]
    assert out["fold_check"]["same_architecture"] is True


def test_inspect_bcresnet(capsys):
    assert main(["inspect", "--backbone", "bcresnet-1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fold_check"]["max_abs_diff"] <= 1e-5 and out["fold_check"]["ok"]
    assert any(layer["kind"] == "dwconv2d" for layer in out["layers"])


@pytest.mark.parametrize("args,needle", [
    (["inspect", "--backbone", "timm:no_such_net"], "no_such_net"),
    (["inspect", "--backbone", "bcresnet-7"], "bcresnet-7"),
    (["inspect", "--backbone", "vgg"], "known"),
    (["inspect", "--backbone", "timm:resnet18", "--weights", "/nonexistent.pt"], "nonexistent"),
    (["inspect", "--backbone", "timm:resnet18", "--weights", "hub"], "never downloaded"),
])
def test_bad_input_exit_2_one_line(capsys, args, needle):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage: swr " + name in capsys.readouterr().out
