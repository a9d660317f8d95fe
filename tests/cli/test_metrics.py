"""``ncfast metrics`` over bfloat16 arrays, which numpy cannot name: 2-byte raw values (dtype V2,
as np.save writes an ml_dtypes/JAX bfloat16 array) or their bits as int16/uint16 (a torch tensor
saved through ``t.view(torch.int16)``), read as bfloat16 under ``--bfloat16``, one line and
exit 2 without it."""

import json
import re

import numpy as np
import pytest
import torch

from ncfast import NCStats
from ncfast.cli import main

NAMES = ("nc1", "cdnv", "max_angle_means", "nc2", "nc3", "nc4", "max_angle_classifier", "ncc_mismatch")


def _problem(K=5, d=6, n=200):
    g = torch.Generator().manual_seed(4)
    means = 3 * torch.randn(K, d, generator=g)
    target = torch.cat([torch.arange(K), torch.randint(0, K, (n - K,), generator=g)])
    features = (means[target] + 0.5 * torch.randn(n, d, generator=g)).to(torch.bfloat16)
    weight = (means + 0.3 * torch.randn(K, d, generator=g)).to(torch.bfloat16)
    bias = torch.randn(K, generator=g).to(torch.bfloat16)
    return features, target, weight, bias


def _bits(tensor, form):
    bits = tensor.view(torch.int16).numpy()
    return {"V2": bits.view("V2"), "int16": bits, "uint16": bits.view(np.uint16)}[form]


def _run(capsys, *args):
    code = main(["metrics", *map(str, args), "--quiet", "--batch-size", "64"])
    return code, capsys.readouterr()


@pytest.mark.parametrize("form", ["V2", "int16", "uint16"])
def test_bfloat16_bits_read_as_bfloat16(tmp_path, capsys, form):
    features, target, weight, bias = _problem()
    paths = {name: tmp_path / f"{name}.npy" for name in ("f", "y", "w", "b")}
    for name, value in (("f", _bits(features, form)), ("y", target.numpy()), ("w", _bits(weight, form)),
                        ("b", _bits(bias, form))):
        np.save(paths[name], value)
    if form == "V2":
        assert np.load(paths["f"]).dtype == np.dtype("V2")  # what numpy reads back
    code, out = _run(capsys, paths["f"], paths["y"], "--weight", paths["w"], "--bias", paths["b"], "--bfloat16",
                     "--json")
    assert code == 0, out.err
    got = json.loads(out.out)
    stats = NCStats(5, 6)  # the same bfloat16 batches through the API
    for start in range(0, features.shape[0], 64):
        stats.update(features[start:start + 64], target[start:start + 64])
    second = stats.second_pass(weight, bias).update(features, target)
    want = stats.compute(weight, bias, second_pass=second)
    for name in NAMES:
        assert got[name] == pytest.approx(getattr(want, name), rel=1e-12), name


def test_raw_two_byte_values_without_the_flag_are_one_line_exit_2(tmp_path, capsys):
    features, target, weight, _ = _problem()
    np.save(tmp_path / "f.npy", _bits(features, "V2"))
    np.save(tmp_path / "y.npy", target.numpy())
    np.save(tmp_path / "f32.npy", features.float().numpy())
    np.save(tmp_path / "w.npy", _bits(weight, "V2"))
    np.save(tmp_path / "i32.npy", np.zeros((200, 6), dtype=np.int32))
    for args, message in (
        ([tmp_path / "f.npy", tmp_path / "y.npy"], r"features: .*\(dtype V2\).*pass --bfloat16"),
        ([tmp_path / "f32.npy", tmp_path / "y.npy", "--weight", tmp_path / "w.npy"], "weight: .*pass --bfloat16"),
        ([tmp_path / "i32.npy", tmp_path / "y.npy", "--bfloat16"], "features: expected floating-point values, got int32"),
    ):
        code, out = _run(capsys, *args)
        assert code == 2 and out.out == ""
        assert len(out.err.strip().splitlines()) == 1 and re.search(message, out.err), out.err
