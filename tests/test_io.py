import os

from swr.io import write_json


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(umask)
    assert oct(os.stat(tmp_path / "r.json").st_mode & 0o777) == oct(0o644)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_save_safetensors_gives_the_same_bytes_for_the_same_content(tmp_path):
    # safetensors writes metadata in hash-map order, which differs between calls and
    # processes; swr's one writer sorts it, so a re-run's files compare equal byte for byte
    import torch
    from safetensors.torch import load_file

    from swr.io import save_safetensors

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.int64)}
    meta = {k: str(i) for i, k in enumerate("zyxwvutsrq")}
    sizes = {save_safetensors(tensors, tmp_path / f"{i}.safetensors", meta) for i in range(12)}
    first = (tmp_path / "0.safetensors").read_bytes()
    assert all((tmp_path / f"{i}.safetensors").read_bytes() == first for i in range(12))
    assert sizes == {len(first)}
    back = load_file(str(tmp_path / "0.safetensors"))
    assert set(back) == {"a", "b"} and torch.equal(back["b"], tensors["b"])
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".safetensors")]
