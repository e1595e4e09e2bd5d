"""moe-bench (moe_kernels.cli), the side-by-side benchmark and their helpers, on tiny sizes."""

from __future__ import annotations

import csv
import importlib.util
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

import moe_kernels
from moe_kernels import _tolerances, cli
from moe_kernels.bench import compare as cmp
from moe_kernels.bench import harness as bu
from moe_kernels.bench import machine

SMALL = ["--shape", "small", "--tokens", "1,5", "--repeats", "1", "--plain"]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_default_job_small(tmp_path, capsys):
    out_csv = tmp_path / "res.csv"
    rc = cli.main([*SMALL, "--csv", str(out_csv)])
    text = capsys.readouterr().out
    assert rc == 0, text
    rows = _read_csv(out_csv)
    available = [n for n, (ok, _) in moe_kernels.available_backends().items() if ok]
    assert {r["backend"] for r in rows} == set(available)
    assert {int(r["T"]) for r in rows} == {1, 5}
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["median_ms"]) > 0
        assert float(r["max_rel_err"]) <= cli.TOLERANCE[torch.bfloat16]
    ref = [r for r in rows if r["backend"] == "reference"]
    assert all(float(r["max_rel_err"]) == 0.0 for r in ref)
    assert "max rel err" in text and "median ms" in text


def test_default_job_scales_the_qwen3_layer(capsys, monkeypatch):
    seen = []
    real = bu.make_inputs

    def spy(shape, tokens, **kw):
        seen.append(shape)
        return real(shape, tokens, **kw)

    monkeypatch.setattr(bu, "make_inputs", spy)
    rc = cli.main(["--tokens", "1", "--repeats", "1", "--plain", "--budget-mib", "40"])
    text = capsys.readouterr().out
    assert rc == 0, text
    (shape,) = set(seen)
    q = bu.SHAPES["qwen3-30b-a3b"]
    assert (shape.hidden, shape.top_k) == (q.hidden, q.top_k)
    assert shape.weight_bytes(2) <= 40 << 20
    assert "scaled down" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without the cuda backend")
def test_explicit_unavailable_backend_fails(capsys):
    rc = cli.main([*SMALL, "--backends", "cuda"])
    assert rc == 1
    assert "unavailable" in capsys.readouterr().out


def _fake_backend(monkeypatch, behaviour):
    """Pretend a 'cpu' backend is available whose moe_ffn misbehaves."""
    avail = dict(moe_kernels.available_backends())
    avail["cpu"] = (True, "test double")
    monkeypatch.setattr(moe_kernels, "available_backends", lambda: avail)
    real = moe_kernels.moe_ffn

    def moe_ffn(*args, backend=None, **kwargs):
        if backend == "cpu":
            return behaviour(real(*args, backend="reference", **kwargs))
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(moe_kernels, "moe_ffn", moe_ffn)


def test_backend_that_raises_gives_nonzero_exit(monkeypatch, capsys):
    def boom(_out):
        raise RuntimeError("kernel exploded")

    _fake_backend(monkeypatch, boom)
    rc = cli.main([*SMALL, "--backends", "cpu"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "kernel exploded" in text and "FAILED" in text


def test_backend_with_wrong_values_gives_nonzero_exit(monkeypatch, capsys):
    _fake_backend(monkeypatch, lambda out: out * 1.5)
    rc = cli.main([*SMALL, "--backends", "cpu"])
    assert rc == 1
    assert "FAIL" in capsys.readouterr().out


def test_backend_with_nan_gives_nonzero_exit(monkeypatch, capsys):
    def poison(out):
        out = out.clone()
        out.view(-1)[0] = float("nan")
        return out

    _fake_backend(monkeypatch, poison)
    assert cli.main([*SMALL, "--backends", "cpu"]) == 1


def test_bad_arguments_exit_2(capsys):
    assert cli.main(["--shape", "nope"]) == 2
    assert "unknown shape" in capsys.readouterr().err
    assert cli.main(["--dtype", "int8"]) == 2
    assert cli.main(["--backends", "tpu"]) == 2


def test_full_compare_small(tmp_path, capsys):
    """The side-by-side comparison end to end on a tiny layer and tiny ceilings."""
    pytest.importorskip("transformers", minversion="5.0")
    out_csv = tmp_path / "cmp.csv"
    rc = cli.main(
        [
            "--full",
            "--shape",
            "small",
            "--tokens",
            "1,8,40",
            "--decode-max-tokens",
            "8",
            "--repeats",
            "2",
            "--read-mib",
            "64",
            "--dense-mnk",
            "64,128,96",
            "--no-fp32-ceiling",
            "--plain",
            "--csv",
            str(out_csv),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    rows = _read_csv(out_csv)
    names = {r["contender"] for r in rows}
    assert set(cmp.BASELINES) | {"cpu", "read-ceiling"} <= names
    for r in rows:
        assert int(r["samples"]) == 2, r
        assert float(r["median_ms"]) > 0
        assert (r["evicted"] == "True") == (int(r["T"]) <= 8)
        if r["contender"] == "read-ceiling":
            assert float(r["pct_read_bw"]) == pytest.approx(100.0)
            assert float(r["GBps"]) == pytest.approx(float(r["read_bw_GBps"]))
        elif r["contender"] != "dense-matmul":
            # HF experts on the same weights and routing agree with the reference
            assert float(r["rel_err_vs_reference"]) < 2e-2, r
    eager = [r for r in rows if r["contender"] == "hf-eager"]
    assert all(abs(float(r["speedup_vs_eager"]) - 1.0) < 1e-9 for r in eager)
    assert "read ceiling" in text and "dense ceiling" in text
    # the installed CLI has no targets (they belong to the source tree's bench/)
    assert all(r["target"] == "" and r["target_met"] == "" for r in rows)


@pytest.mark.skipif(not moe_kernels.available_backends()["cpu"][0], reason="no cpu backend")
def test_compare_with_targets(tmp_path, capsys):
    """Targets passed in reach the cpu row: all met -> yes, one missed -> NO."""
    out_csv = tmp_path / "cmp.csv"
    seen = []

    def targets(shape, tokens, decode):
        seen.append((shape, tokens, decode))
        met = (">=0% read BW", "pct_read_bw", 0.0)
        return [met] if tokens == 2 else [met, (">=1e9% read BW", "pct_read_bw", 1e9)]

    argv = ["--shape", "small", "--tokens", "2,3", "--contenders", "reference", "--repeats", "1"]
    argv += ["--read-mib", "16", "--dense-mnk", "32,64,48", "--no-fp32-ceiling", "--plain"]
    rc = cmp.main([*argv, "--backends", "cpu", "--csv", str(out_csv)], targets=targets)
    assert rc == 0, capsys.readouterr().out
    assert seen == [("small", 2, True), ("small", 3, True)]
    rows = {int(r["T"]): r for r in _read_csv(out_csv) if r["contender"] == "cpu"}
    assert rows[2]["target"] == ">=0% read BW" and rows[2]["target_met"] == "yes"
    assert rows[3]["target"] == ">=0% read BW; >=1e9% read BW" and rows[3]["target_met"] == "NO"


def test_bench_script_help():
    script = "bench/bench_moe_ffn.py"
    if shutil.which(sys.executable) is None:
        pytest.skip("no python executable")
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, os.path.join(root, script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "--contenders" in res.stdout


# ------------------------------------------------------------------------------------ helpers


def test_scale_to_budget_keeps_h_and_k():
    for shape in bu.SHAPES.values():
        s = bu.scale_to_budget(shape, 64 << 20, 2)
        assert (s.hidden, s.top_k) == (shape.hidden, shape.top_k)
        assert s.experts >= min(shape.experts, 2 * shape.top_k)
        assert s.weight_bytes(2) <= 64 << 20
    q = bu.SHAPES["qwen3-30b-a3b"]
    assert bu.scale_to_budget(q, 1 << 40, 2) == q


def test_make_inputs_routing():
    shape = bu.SHAPES["small"]
    inp = bu.make_inputs(shape, 9, dtype=torch.float32, seed=3)
    assert inp["x"].shape == (9, shape.hidden)
    assert inp["w_gate_up"].shape == (shape.experts, 2 * shape.intermediate, shape.hidden)
    assert inp["w_down"].shape == (shape.experts, shape.hidden, shape.intermediate)
    assert inp["topk_ids"].dtype == torch.int32 and inp["topk_weights"].dtype == torch.float32
    ids = inp["topk_ids"]
    assert all(len(set(row)) == shape.top_k for row in ids.tolist())
    assert torch.allclose(inp["topk_weights"].sum(-1), torch.ones(9), atol=1e-6)
    assert inp["w_gate_up"].abs().min() >= 0 and inp["w_gate_up"].std() > 0
    again = bu.make_inputs(shape, 9, dtype=torch.float32, seed=3)
    assert torch.equal(again["w_down"], inp["w_down"]) and torch.equal(again["topk_ids"], ids)


def test_error_column_is_max_rel_err():
    """Both jobs' error column is the package's one metric (not a copy of it)."""
    assert cli.max_rel_err is _tolerances.max_rel_err
    assert cmp.max_rel_err is _tolerances.max_rel_err
    ref = torch.tensor([1.0, -4.0, 2.0])
    err = _tolerances.max_rel_err
    assert err(ref, ref) == 0.0
    assert err(ref + torch.tensor([0.0, 0.0, 0.4]), ref) == pytest.approx(0.1)
    assert err(torch.tensor([float("nan"), 0, 0]), ref) == float("inf")
    assert err(ref[:2], ref) == float("inf")


def test_time_alternating_order_and_errors():
    order = []

    def bad():
        order.append("C")
        if len([o for o in order if o == "C"]) > 2:
            raise RuntimeError("third call fails")

    contenders = {"A": lambda: order.append("A"), "B": lambda: order.append("B"), "C": bad}
    times, errors = bu.time_alternating(contenders, repeats=3, warmup=1)
    # warm-up A, B, C, then rounds A B C / A B C(fails) / A B
    assert order == ["A", "B", "C", "A", "B", "C", "A", "B", "C", "A", "B"]
    assert len(times["A"]) == 3 and len(times["C"]) == 1
    assert "third call fails" in errors["C"]


def test_l3_and_evictor():
    l3 = machine.l3_cache_bytes()
    assert l3 >= 1 << 20
    ev = bu.CacheEvictor("cpu")
    assert ev.nbytes >= 3 * l3
    ev()
    ev()


def test_ceilings_tiny():
    bw, sec = bu.read_bandwidth_ceiling(8 << 20, repeats=2)
    assert bw > 0 and sec > 0
    d = bu.dense_matmul_ceiling(32, 64, 48, repeats=2, dtype=torch.float32)
    assert d["rate"] > 0 and d["layout"] in bu.MATMUL_LAYOUTS
    assert set(d["probe"]) == set(bu.MATMUL_LAYOUTS)


def test_cpu_model_and_flags():
    model, flags = machine.cpu_model(), machine.cpu_flags()
    assert isinstance(model, str) and model
    assert isinstance(flags, frozenset)
    if os.path.exists("/proc/cpuinfo") and platform.machine() in ("x86_64", "AMD64"):
        assert {"sse2", "fpu"} <= flags, sorted(flags)[:20]
        assert model != "unknown CPU"


def _bench_script():
    """The source tree's bench/bench_moe_ffn.py as a module (it owns the project's targets)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "bench", "bench_moe_ffn.py")
    spec = importlib.util.spec_from_file_location("bench_moe_ffn", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_targets_table():
    targets = _bench_script().targets
    checks = targets("qwen3-30b-a3b", 2048, decode=False)
    assert {d for d, _, _ in checks} == {">=2.0x eager", ">=60% dense"}
    row = {"speedup_vs_eager": 2.1, "pct_dense": 61.0, "pct_read_bw": 0.0}
    assert cmp.target_status(checks, row) == "yes"
    row["pct_dense"] = 59.0
    assert cmp.target_status(checks, row) == "NO"
    row["speedup_vs_eager"] = float("nan")  # eager not timed
    assert cmp.target_status(checks, row) == "n/a"
    ((desc, key, minimum),) = targets("mixtral-8x7b", 1, decode=True)
    assert (desc, key, minimum) == (">=75% read BW", "pct_read_bw", 75.0)
    assert targets("small", 512, decode=False) == []
