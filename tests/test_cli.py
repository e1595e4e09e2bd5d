"""moe-bench (moe_kernels.cli), the side-by-side benchmark and their helpers, on tiny sizes."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import moe_kernels
from moe_kernels import _tolerances, cli
from moe_kernels.bench import compare as cmp
from moe_kernels.bench import harness as bu
from moe_kernels.bench import machine, peers, roofline, schema
from moe_kernels.bench import ops as bops

#: the default job on a tiny layer, with tiny ceilings
SMALL = [
    "--shape",
    "small",
    "--tokens",
    "1,5",
    "--repeats",
    "1",
    "--plain",
    "--read-mib",
    "16",
    "--dense-mnk",
    "64,64,64",
]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _usable_backends():
    from moe_kernels import _backends

    return {
        n
        for n, (ok, _) in moe_kernels.available_backends().items()
        if ok and "cpu" in _backends._BACKENDS[n].devices()
    }


def test_default_job_small(tmp_path, capsys):
    out_csv = tmp_path / "res.csv"
    rc = cli.main([*SMALL, "--csv", str(out_csv)])
    text = capsys.readouterr().out
    assert rc == 0, text
    rows = _read_csv(out_csv)
    ours = [r for r in rows if r["kind"] == "backend"]
    assert {r["backend"] for r in ours} == _usable_backends()
    assert {r["op"] for r in rows} == set(roofline.OPS)
    assert {r["pass"] for r in rows} == {"fwd"}
    assert {int(r["T"]) for r in rows} == {1, 5}
    for r in ours:
        assert r["status"] in ("ok", "n/a"), r
        if r["status"] == "ok":
            assert float(r["median_ms"]) > 0
            assert float(r["max_rel_err"]) <= float(r["tolerance"])
    ref = [r for r in rows if r["backend"] == "reference"]
    assert all(float(r["max_rel_err"]) == 0.0 for r in ref)
    # the peers that transformers provides ran on the expert FFN
    if bu.transformers_version() is not None:
        hf = {r["backend"] for r in rows if r["op"] == "moe_ffn" and r["kind"] == "peer"}
        assert {"hf-eager", "hf-grouped_mm", "hf-batched_mm"} <= hf
    assert "max rel err" in text and "median ms" in text and "pred ms" in text
    assert "ceilings (measured now)" in text


def test_default_job_scales_the_qwen3_layer(capsys, monkeypatch):
    seen = []
    real = bops.make_case

    def spy(shape, tokens, **kw):
        seen.append(shape)
        return real(shape, tokens, **kw)

    monkeypatch.setattr(bops, "make_case", spy)
    argv = ["--tokens", "1", "--repeats", "1", "--plain", "--budget-mib", "40"]
    rc = cli.main([*argv, "--ops", "moe_ffn", "--no-ceilings", "--peers", "none"])
    text = capsys.readouterr().out
    assert rc == 0, text
    (shape,) = set(seen)
    q = bu.SHAPES["qwen3-30b-a3b"]
    assert (shape.hidden, shape.top_k) == (q.hidden, q.top_k)
    assert shape.weight_bytes(2) <= 40 << 20
    assert "scaled down" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without the cuda backend")
def test_explicit_unavailable_backend_fails(capsys):
    rc = cli.main([*SMALL, "--ops", "moe_ffn", "--backends", "cuda"])
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


FFN_ONLY = ["--ops", "moe_ffn", "--peers", "none"]


def test_backend_that_raises_gives_nonzero_exit(monkeypatch, capsys):
    def boom(_out):
        raise RuntimeError("kernel exploded")

    _fake_backend(monkeypatch, boom)
    rc = cli.main([*SMALL, *FFN_ONLY, "--backends", "cpu"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "kernel exploded" in text and "FAILED" in text


def test_backend_with_wrong_values_gives_nonzero_exit(monkeypatch, capsys):
    _fake_backend(monkeypatch, lambda out: out * 1.5)
    rc = cli.main([*SMALL, *FFN_ONLY, "--backends", "cpu"])
    assert rc == 1
    assert "FAIL" in capsys.readouterr().out


def test_backend_with_nan_gives_nonzero_exit(monkeypatch, capsys):
    def poison(out):
        out = out.clone()
        out.view(-1)[0] = float("nan")
        return out

    _fake_backend(monkeypatch, poison)
    assert cli.main([*SMALL, *FFN_ONLY, "--backends", "cpu"]) == 1


def test_bad_arguments_exit_2(capsys):
    assert cli.main(["--shape", "nope"]) == 2
    assert "unknown shape" in capsys.readouterr().err
    assert cli.main(["--dtype", "int8"]) == 2
    assert cli.main(["--backends", "tpu"]) == 2


FULL_SMALL = [
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
]


def test_full_compare_small(tmp_path, capsys):
    """The side-by-side comparison end to end on a tiny layer and tiny ceilings (its own CSV
    layout, written by bench/bench_moe_ffn.py's entry point)."""
    pytest.importorskip("transformers", minversion="5.0")
    out_csv = tmp_path / "cmp.csv"
    rc = cmp.main([*FULL_SMALL, "--csv", str(out_csv)])
    text = capsys.readouterr().out
    assert rc == 0, text
    rows = _read_csv(out_csv)
    assert list(rows[0]) == list(cmp.CSV_HEADERS)
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


def test_full_compare_writes_the_one_schema(tmp_path, capsys):
    """moe-bench --full writes its rows in the default job's schema (JSON and CSV)."""
    pytest.importorskip("transformers", minversion="5.0")
    out_json, out_csv = tmp_path / "full.json", tmp_path / "full.csv"
    argv = [*FULL_SMALL, "--contenders", "reference,hf-eager", "--tokens", "2,9"]
    rc = cli.main(["--full", *argv, "--json", str(out_json), "--csv", str(out_csv)])
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(out_json.read_text())
    assert schema.validate(doc) == []
    rows = doc["rows"]
    assert {r["backend"] for r in rows} >= {"reference", "hf-eager", "read-ceiling"}
    assert {r["kind"] for r in rows} == {"backend", "peer", "ceiling"}
    assert all(r["op"] == "moe_ffn" and r["pass"] == "fwd" for r in rows)
    eager = [r for r in rows if r["backend"] == "hf-eager"]
    assert all(r["speedup"] == pytest.approx(1.0) for r in eager)
    assert len(_read_csv(out_csv)) == len(rows)


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


def _bench_script(name="bench_moe_ffn"):
    """A script of the source tree's bench/ as a module (bench_moe_ffn.py owns the project's
    targets, amx_targets.py the AMX machines')."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
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


# ------------------------------------------------------------------------ presets and shapes

#: each model's MoE layer as its published config.json states it (hidden_size, the experts'
#: intermediate size, routed experts, experts per token), written out independently of
#: moe_kernels/bench/presets.py
PUBLISHED = {
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "mixtral-8x22b": (6144, 16384, 8, 2),
    "deepseek-v3": (7168, 2048, 256, 8),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "qwen3-235b-a22b": (4096, 1536, 128, 8),
    "gpt-oss-20b": (2880, 2880, 32, 4),
    "gpt-oss-120b": (2880, 2880, 128, 4),
    "olmoe-1b-7b": (2048, 1024, 64, 8),
    "dbrx": (6144, 10752, 16, 4),
    "llama-4-scout": (5120, 8192, 16, 1),
}


def test_list_presets_matches_published_configs(capsys):
    assert cli.main(["--list-presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    by_name = {line.split()[0]: line for line in lines}
    assert set(PUBLISHED) <= set(by_name)
    for name, (H, inter, E, k) in PUBLISHED.items():
        line = by_name[name]
        m = re.search(r"H\s+(\d+)\s+I\s+(\d+)\s+E\s+(\d+)\s+k\s+(\d+)\s+(\S+)", line)
        assert m, line
        assert tuple(int(v) for v in m.groups()[:4]) == (H, inter, E, k), line
        assert m.group(5).startswith("https://huggingface.co/") and "config.json" in line
    ds, scout, oss = bu.SHAPES["deepseek-v3"], bu.SHAPES["llama-4-scout"], bu.SHAPES["gpt-oss-20b"]
    assert (ds.scoring, ds.num_expert_groups, ds.topk_groups) == ("sigmoid", 8, 4)
    assert ds.correction_bias and ds.routed_scaling_factor == 2.5
    assert (ds.num_shared_experts, ds.shared_intermediate_size) == (1, 2048)
    assert (scout.num_shared_experts, scout.shared_intermediate_size) == (1, 8192)
    assert scout.approximation and "approximated" in by_name["llama-4-scout"]
    assert (oss.activation, oss.interleaved, oss.bias, oss.router_bias) == (
        "swiglu_oai",
        True,
        True,
        True,
    )
    assert not bu.SHAPES["olmoe-1b-7b"].renormalize


def test_parse_shapes():
    shapes = bu.parse_shapes("qwen3-30b-a3b,256,128,8,2,small")
    assert [s.name for s in shapes] == ["qwen3-30b-a3b", "custom-256-128-8-2", "small"]
    c = shapes[1]
    assert (c.hidden, c.intermediate, c.experts, c.top_k) == (256, 128, 8, 2)
    for bad in ("256,128,8", "256,128,small,8,2", "256,128,2,4", "nope"):
        with pytest.raises(ValueError):
            bu.parse_shapes(bad)


def test_custom_shape_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "c.json"
    argv = [*SMALL, "--shape", "128,64,8,2", "--ops", "moe_ffn", "--json", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {(r["H"], r["I"], r["E"], r["k"]) for r in rows} == {(128, 64, 8, 2)}


def test_scale_keeps_expert_groups_valid():
    ds = bu.SHAPES["deepseek-v3"]
    s = bu.scale_to_budget(ds, 64 << 20, 2)
    assert s.weight_bytes(2) <= 64 << 20
    assert s.experts % ds.num_expert_groups == 0
    assert s.experts // ds.num_expert_groups * ds.topk_groups >= ds.top_k
    assert 0 < s.shared_intermediate_size <= ds.shared_intermediate_size
    assert (s.hidden, s.top_k, s.scoring) == (ds.hidden, ds.top_k, ds.scoring)


# ------------------------------------------------------------------- output schema, plots


def _readme_fields(section: str) -> list[str]:
    """The field names README.md lists in the table under ``section`` (first column)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        text = f.read()
    start = text.index(section)
    fields = []
    for line in text[start:].splitlines()[1:]:
        if fields and not line.startswith("|"):
            break
        m = re.match(r"\|([^|]*)\|", line)
        if m:
            fields += re.findall(r"`([A-Za-z_0-9]+)`", m.group(1))
    return fields


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_json_csv_plot_every_op_both_passes(tmp_path, capsys):
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    argv = [*SMALL, "--pass", "both", "--tokens", "3"]
    argv += ["--json", str(out_json), "--csv", str(out_csv), "--plot", str(out_png)]
    rc = cli.main(argv)
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(out_json.read_text())
    # an independent check: every field README.md documents is in the output, and no other
    meta_fields = _readme_fields("#### `meta`")
    row_fields = _readme_fields("#### `rows`")
    assert len(meta_fields) >= 20 and len(row_fields) >= 30
    assert set(doc) == {"meta", "rows"}
    assert set(doc["meta"]) == set(meta_fields)
    for r in doc["rows"]:
        assert set(r) == set(row_fields), r
    assert schema.validate(doc) == []
    meta = doc["meta"]
    assert meta["cpu_model"] and meta["num_threads"] == torch.get_num_threads()
    assert meta["ceilings"]["read_gbps"] > 0 and meta["ceilings"]["dense_tflops"] > 0
    assert meta["schema"] == schema.SCHEMA_VERSION and meta["torch"] == torch.__version__
    ops_passes = {(r["op"], r["pass"]) for r in doc["rows"]}
    for op in roofline.OPS:
        assert (op, "fwd") in ops_passes
        assert ((op, "bwd") in ops_passes) == (op != "route")
    for r in doc["rows"]:
        if r["status"] == "ok":
            assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r["pred_h100_ms"] >= r["pred_h200_ms"] > 0
            assert r["speedup"] > 0 and r["pct_of_ceiling"] > 0
    csv_rows = _read_csv(out_csv)
    assert len(csv_rows) == len(doc["rows"])
    assert list(csv_rows[0]) == [*schema.ROW_FIELDS, *schema.META_FIELDS]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schema_validate_finds_problems():
    assert schema.validate({"meta": {}, "rows": []})  # every meta field missing
    row = dict.fromkeys(schema.ROW_FIELDS)
    meta = dict.fromkeys(schema.META_FIELDS)
    meta["schema"] = schema.SCHEMA_VERSION
    assert schema.validate({"meta": meta, "rows": [row]}) == []
    row["extra"] = 1
    assert schema.validate({"meta": meta, "rows": [row]})


# ----------------------------------------------------------------- routing, peers, layer


def test_routing_distributions():
    shape = bu.SHAPES["small"]
    k, E = shape.top_k, shape.experts
    kw = {"dtype": torch.float32, "device": torch.device("cpu")}
    one = bops.make_case(shape, 64, routing="one", **kw)
    assert set(one.topk_ids.flatten().tolist()) == set(range(k))
    assert one.active_experts == k
    zipf = bops.make_case(shape, 512, routing="zipf", skew=1.5, **kw)
    counts = torch.bincount(zipf.topk_ids.flatten().long(), minlength=E)
    assert counts[0] == counts.max() and counts[0] > 3 * counts[-1]
    uni = bops.make_case(shape, 512, routing="uniform", **kw)
    counts = torch.bincount(uni.topk_ids.flatten().long(), minlength=E).float()
    assert counts.max() < 1.5 * counts.mean()
    for case in (one, zipf, uni):
        ids = case.topk_ids
        assert all(len(set(row)) == k for row in ids.tolist())  # k distinct experts per token
    assert zipf.routing == "zipf(s=1.5)"


def test_routing_is_recorded(tmp_path, capsys):
    out = tmp_path / "z.json"
    argv = [*SMALL, "--ops", "moe_ffn", "--skew", "2", "--peers", "none", "--json", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert {r["routing"] for r in doc["rows"]} == {"zipf(s=2)"}


def test_uninstalled_peers_are_listed_as_skipped(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert cli.main([*SMALL, "--ops", "grouped_gemm", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    meta = json.loads(out.read_text())["meta"]
    assert set(meta["peers"]) == set(peers.PEERS)
    if importlib.util.find_spec("vllm") is None:
        assert meta["peers"]["vllm-fused_moe"] == "skipped: vllm is not installed"
        assert "vllm-fused_moe" in text and "not installed" in text
    if not torch.cuda.is_available():
        assert "skipped" in meta["peers"]["grouped_gemm-pkg"]


def test_batched_mm_skipped_where_it_would_not_fit(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers", minversion="5.0")
    monkeypatch.setattr(peers, "_free_bytes", lambda device: 1 << 20)
    out = tmp_path / "b.json"
    assert cli.main([*SMALL, "--ops", "moe_ffn", "--json", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["backend"] == "hf-batched_mm"]
    assert rows and all(r["status"] == "skipped" and "gather" in r["note"] for r in rows)
    assert all(r["median_ms"] is None for r in rows)


def test_a_peer_over_tolerance_is_flagged_not_fatal(tmp_path, capsys, monkeypatch):
    real = peers.build

    def wrong(name, op, case, pass_):
        fwd, graph, note = real(name, op, case, pass_)
        return (lambda: fwd() * 2), graph, note

    monkeypatch.setattr(peers, "build", wrong)
    out = tmp_path / "f.json"
    argv = [*SMALL, "--ops", "grouped_gemm", "--peers", "torch-grouped_mm", "--json", str(out)]
    rc = cli.main(argv)
    text = capsys.readouterr().out
    rows = [r for r in json.loads(out.read_text())["rows"] if r["kind"] == "peer"]
    assert rc == 0, text
    ran = [r for r in rows if r["status"] not in ("skipped", "ERROR")]
    assert ran and all(r["status"] == "FAIL" for r in ran)


def _layer_rows(tmp_path, capsys, shape="deepseek-v3"):
    out = tmp_path / "l.json"
    argv = [*SMALL, "--shape", shape, "--budget-mib", "8", "--ops", "layer", "--tokens", "2"]
    assert cli.main([*argv, "--json", str(out)]) == 0, capsys.readouterr().out
    return json.loads(out.read_text())["rows"]


def test_layer_runs_the_shared_experts(tmp_path, capsys):
    """DeepSeek-V3's layer runs with its shared expert: its FLOPs are counted, nothing is left
    out, and every backend agrees with the reference."""
    rows = _layer_rows(tmp_path, capsys)
    ref = next(r for r in rows if r["backend"] == "reference")
    shape = bu.scale_to_budget(bu.SHAPES["deepseek-v3"], 8 << 20, 2)
    assert shape.shared_intermediate_size > 0
    routed = roofline.counts(
        "layer", "fwd", shape, 2, 2, ref["active_experts"], shared_intermediate=0
    )
    full = roofline.counts("layer", "fwd", shape, 2, 2, ref["active_experts"])
    assert "left out" not in ref["note"]
    assert ref["flops"] == full.flops > routed.flops
    assert all(r["status"] in ("ok", "n/a") for r in rows if r["kind"] == "backend")


def test_layer_says_what_an_older_moe_left_out(tmp_path, capsys, monkeypatch):
    """Where moe_kernels.MoE has no shared-expert options, the layer runs without them and its
    rows say so (and count only what ran)."""

    class OlderMoE(moe_kernels.MoE):
        def __init__(
            self,
            hidden_size,
            intermediate_size,
            num_experts,
            top_k,
            *,
            scoring="softmax",
            renormalize=True,
            num_expert_groups=None,
            topk_groups=None,
            routed_scaling_factor=1.0,
            correction_bias=False,
            activation="swiglu",
            alpha=1.702,
            limit=7.0,
            interleaved=False,
            bias=False,
            router_bias=False,
            device=None,
            dtype=None,
        ):
            super().__init__(
                hidden_size,
                intermediate_size,
                num_experts,
                top_k,
                scoring=scoring,
                renormalize=renormalize,
                num_expert_groups=num_expert_groups,
                topk_groups=topk_groups,
                routed_scaling_factor=routed_scaling_factor,
                correction_bias=correction_bias,
                activation=activation,
                alpha=alpha,
                limit=limit,
                interleaved=interleaved,
                bias=bias,
                router_bias=router_bias,
                device=device,
                dtype=dtype,
            )

    monkeypatch.setattr(moe_kernels, "MoE", OlderMoE)
    rows = _layer_rows(tmp_path, capsys)
    ref = next(r for r in rows if r["backend"] == "reference")
    shape = bu.scale_to_budget(bu.SHAPES["deepseek-v3"], 8 << 20, 2)
    routed = roofline.counts(
        "layer", "fwd", shape, 2, 2, ref["active_experts"], shared_intermediate=0
    )
    assert "shared experts" in ref["note"] and "left out" in ref["note"]
    assert ref["flops"] == routed.flops


def test_llama4_approximation_is_said(tmp_path, capsys):
    out = tmp_path / "l4.json"
    argv = [*SMALL, "--shape", "llama-4-scout", "--budget-mib", "8", "--ops", "layer"]
    assert cli.main([*argv, "--tokens", "2", "--json", str(out)]) == 0, capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert all("approximation" in r["note"] for r in rows if r["kind"] == "backend")


# ------------------------------------------------------------------------ roofline, machine


def test_roofline_counts_and_predictions():
    s = bu.SHAPES["qwen3-30b-a3b"]
    c = roofline.counts("moe_ffn", "fwd", s, 16, 2, 100)
    assert c.flops == 2 * 16 * 8 * 3 * 2048 * 768
    assert c.bytes == 2 * 16 * 2048 * 2 + 100 * 3 * 2048 * 768 * 2 + 8 * 16 * 8
    assert roofline.counts("moe_ffn", "bwd", s, 16, 2, 100).flops == 2 * c.flops
    assert roofline.counts("route", "fwd", s, 16, 2, 100).flops == 0
    h100 = roofline.GPU_SPECS["h100_sxm"]
    want = max(c.flops / h100.dense_flops[torch.bfloat16], c.bytes / h100.hbm_bytes_per_s)
    assert roofline.predict_ms(c, torch.bfloat16, "h100_sxm") == pytest.approx(want * 1e3)
    # same tensor-core peak, more bandwidth: never slower on an H200
    assert roofline.predict_ms(c, torch.bfloat16, "h200") <= want * 1e3
    t, bound = roofline.attainable_seconds(c, 1e12, 1e9)
    assert bound == "memory" and t == pytest.approx(c.bytes / 1e9)


def test_machine_slug_and_uarch():
    slug = machine.machine_slug(torch.device("cpu"))
    assert re.fullmatch(r"[a-z0-9-]+", slug) and slug.startswith("cpu-")
    assert slug.endswith(f"-{torch.get_num_threads()}t")
    if machine._cpuinfo_field("vendor_id") == "AuthenticAMD":
        fam, model = int(machine._cpuinfo_field("cpu family")), int(machine._cpuinfo_field("model"))
        if (fam, model) == (25, 17):  # EPYC 9004 (Genoa)
            assert machine.cpu_uarch() == "Zen 4"
    assert set(machine.isa_flags()) <= set(machine.ISA_FLAGS)


def test_git_commit_recorded_at_build():
    commit = machine.git_commit()
    if importlib.util.find_spec("moe_kernels._build_info") is None and commit is None:
        pytest.skip("not built from a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit), commit


def _check_targets_script():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "check_targets", os.path.join(root, "bench", "check_targets.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_targets"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_check_targets_yes_no_na():
    ct = _check_targets_script()
    T = ct.Target

    def row(backend, ms, T_=1, pct=None):
        return {
            "backend": backend,
            "op": "moe_ffn",
            "pass": "fwd",
            "shape": "s",
            "T": T_,
            "dtype": "bfloat16",
            "median_ms": ms,
            "pct_of_ceiling": pct,
        }

    doc = {
        "meta": {"device_type": "cpu"},
        "rows": [
            row("cpu", 1.0, pct=50.0),
            row("hf-eager", 2.0),
            row("cpu", 4.0, T_=64),
            row("hf-eager", 2.0, T_=64),
        ],
    }
    targets = (
        T("cpu", "moe_ffn", "fwd", (1, 1 << 30), "x hf-eager", 1.5),
        T("cpu", "moe_ffn", "fwd", (1, 1), "pct_of_ceiling", 40.0),
        T("cpu", "moe_ffn", "fwd", (1, 1), "x vllm-fused_moe", 1.0),
        T("cuda", "moe_ffn", "fwd", (1, 1), "x hf-eager", 1.0, device_type="cuda"),
    )
    lines, missed = ct.check(doc, targets)
    assert missed == 1
    assert [line.split()[0] for line in lines] == ["yes", "NO", "yes", "n/a"]


def test_amx_targets_one_run_for_prefill_median_for_decode(tmp_path, capsys):
    """bench/amx_targets.py: prefill targets all met in one run, decode on the median of the
    runs; a missed target, a missing row or too few runs fail it."""
    at = _bench_script("amx_targets")
    headers = cmp.CSV_HEADERS

    def write(path, values, drop=()):
        # values[(shape, T)] = {column: value}; each cpu row follows an hf-eager row
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=headers)
            w.writeheader()
            for (shape, t), cols in values.items():
                if (shape, t) in drop:
                    continue
                base = dict.fromkeys(headers, "")
                w.writerow({**base, "shape": shape, "T": t, "contender": "hf-eager"})
                w.writerow(
                    {**base, "shape": shape, "T": t, "contender": "cpu", "median_ms": 1.0, **cols}
                )

    def good():
        v = {(s, t): {c: need + 0.01} for s, t, c, need in at.DECODE}
        for s, t, c, need in at.PREFILL:
            v.setdefault((s, t), {})[c] = need + 0.01
        return v

    runs = [tmp_path / f"r{i}.csv" for i in range(3)]
    for r in runs:
        write(r, good())
    assert at.main([str(r) for r in runs]) == 0
    assert "all met" in capsys.readouterr().out.splitlines()[-1]

    # the decode median: one run below the bound is outvoted, two are not
    low = good()
    low[("olmoe-1b-7b", 16)]["pct_read_bw"] = 50.0
    write(runs[0], low)
    assert at.main([str(r) for r in runs]) == 0
    write(runs[1], low)
    assert at.main([str(r) for r in runs]) == 1
    out = capsys.readouterr().out
    assert "decode  olmoe-1b-7b T=16: median 50.0" in out and "NOT all met" in out

    # prefill: each target met in some run, but never all in the same one
    a, b = good(), good()
    a[("mixtral-8x7b", 512)]["speedup_vs_eager"] = 1.49
    b[("qwen3-30b-a3b", 2048)]["pct_dense"] = 59.9
    write(runs[0], a)
    write(runs[1], b)
    write(runs[2], a)
    assert at.main([str(r) for r in runs]) == 1
    assert "meets 5 of 6" in capsys.readouterr().out

    # a missing row, and too few runs for the decode medians
    write(runs[0], good())
    write(runs[1], good())
    write(runs[2], good(), drop=[("qwen3-30b-a3b", 512)])
    assert at.main([str(r) for r in runs]) == 0  # runs 1 and 2 carry the prefill targets
    out = capsys.readouterr().out
    assert "run 3  prefill qwen3-30b-a3b T=512: nan x eager (need >= 2)  missing" in out
    assert "prefill: run 1 meets 6 of 6 targets (all in one run)" in out
    assert at.main([str(runs[2])] * 3) == 1
    write(runs[1], good(), drop=[("qwen3-30b-a3b", 1)])
    assert at.main([str(r) for r in runs]) == 1
    assert "decode  qwen3-30b-a3b T=1: median nan" in capsys.readouterr().out
    assert at.main([str(runs[0])]) == 1
    assert "need at least 3" in capsys.readouterr().out
    assert at.main([str(runs[0]), "--min-runs", "1"]) == 0
    # a run that wrote no CSV counts as one whose rows are all missing
    assert at.main([str(runs[0]), str(runs[0]), str(tmp_path / "none.csv")]) == 1
    out = capsys.readouterr().out
    assert "none.csv: no such file" in out and "prefill: run 1 meets 6 of 6" in out
