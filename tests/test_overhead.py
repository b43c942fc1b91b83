"""Smoke test of benchmarks/overhead.py: every variant is timed and counted."""

import json

import pytest

from benchmarks import overhead

HLO = """HloModule jit_f

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}

ENTRY %main (a: f32[4], b: s32[]) -> (f32[4], s32[]) {
  %a = f32[4]{0} parameter(0)
  %b = s32[] parameter(1)
  %c = s32[] constant(1)
  %f = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused
  %g = s32[] add(%b, %c)
  %t = (f32[4]{0}, s32[]) tuple(%f, %g)
  %e = f32[4]{0} get-tuple-element(%t), index=0
  %x = f32[4]{0} bitcast(%e)
  ROOT %r = (f32[4]{0}, s32[]) tuple(%x, %g)
}
"""


def test_kernel_count_skips_parameters_constants_and_plumbing():
    # Only the fusion and the add launch work; the nested computation's
    # instructions are not the entry's.
    assert overhead.kernel_count(HLO) == 2


def test_overhead_reports_every_variant(tmp_path):
    out, hlo = tmp_path / "ov.json", tmp_path / "ov.txt"
    overhead.main(
        ["--sizes", "1e3", "--leaves", "1,2", "--repeats", "3", "--json", str(out)]
        + ["--hlo", str(hlo)]
    )
    # The optimized HLO of the one-leaf programs, one module per variant.
    text = hlo.read_text()
    for name in ("optax", "optaxclip", "state dropped"):
        assert f"#### 1e+03 params, {name}\n" in text
    assert text.count("ENTRY") == 3
    with open(out) as f:
        rows = json.load(f)["rows"]
    names = {"optax", "optaxclip", "state dropped", "state donated", "norm only"}
    for leaves in (1, 2):
        got = {r["impl"]: r for r in rows if r["leaves"] == leaves}
        assert set(got) == names
        for r in got.values():
            assert r["latency"] > 0 and r["throughput"] > 0 and r["dispatch"] > 0
            assert r["kernels"] >= 1
        # Dropping the state outputs can only remove work.
        assert got["state dropped"]["kernels"] <= got["optaxclip"]["kernels"]
        assert got["norm only"]["kernels"] <= got["optaxclip"]["kernels"]


@pytest.mark.parametrize(
    ("flag", "value"), [("--sizes", "0"), ("--leaves", "x"), ("--repeats", "0")]
)
def test_overhead_refuses_bad_flags_naming_them(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        overhead.main([flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err
