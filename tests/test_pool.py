"""Pool files: the catalog, loading, and every refusal message."""

import pytest

from chipfuse.cluster.catalog import load_catalog
from chipfuse.cluster.pool import load_pool, pool_from_dict
from chipfuse.errors import PoolError

REQUIRED_CHIPS = ["H100", "H800", "H20", "A100", "A800", "V100", "T4", "L4", "L40S", "RTX-4090", "RTX-3090",
                  "MI250X", "MI300X", "Ascend-910B", "Gaudi2", "cpu"]


def test_catalog_has_required_chips_with_sources():
    from chipfuse.cluster.catalog import get_chip

    for name in REQUIRED_CHIPS:
        chip = get_chip(name)
        assert chip.source, name
        assert chip.flops_bf16 >= chip.flops_fp32 > 0
        assert chip.memory_bytes > 0 and chip.mem_bw > 0 and chip.link_bw > 0
    # Export-limited variants keep compute but lose chip-to-chip bandwidth.
    cat = load_catalog()
    assert cat["H800-SXM"].flops_bf16 == cat["H100-SXM"].flops_bf16
    assert cat["H800-SXM"].link_bw < cat["H100-SXM"].link_bw
    assert cat["A800-SXM-80GB"].link_bw < cat["A100-SXM-80GB"].link_bw


def _pool(**dev):
    d = {"name": "d0", "chip": "A100"}
    d.update(dev)
    return {"node": [{"name": "n0", "device": [d]}]}


def test_pool_loads_and_expands_counts(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('''
name = "mix"
[[node]]
name = "a"
[[node.device]]
name = "gpu"
chip = "A100"
count = 2
[[node]]
name = "b"
[[node.device]]
name = "t4"
chip = "T4"
emulate = { speed = 0.25, memory_gib = 0.5 }
[[link]]
nodes = ["a", "b"]
bandwidth_gbit_s = 10
latency_ms = 1
''')
    pool = load_pool(f)
    assert [d.name for d in pool.devices] == ["gpu0", "gpu1", "t4"]
    assert pool.device("t4").emulated and pool.device("t4").memory_bytes == 512 << 20
    assert pool.link("a", "b").bandwidth == pytest.approx(10e9 / 8)
    assert pool.link("a", "a").bandwidth == pool.nodes[0].intra_bandwidth
    assert pool.emulated


@pytest.mark.parametrize(
    "raw, field, fix",
    [
        ({"node": []}, "node", "[[node]]"),
        ({"node": [{"name": "n0"}]}, "node[0].device", "[[node.device]]"),
        ({"node": [{"name": "n0", "device": [{"name": "x"}]}]}, "node[0].device[0].chip", "add `chip"),
        (_pool(chip="Z9000"), "node[0].device[0].chip", "catalog name"),
        (_pool(memory_gib=-4), "node[0].device[0].memory_gib", "above 0"),
        (_pool(memory_gib="lots"), "node[0].device[0].memory_gib", "<number>"),
        (_pool(emulate={"speed": 0}), "node[0].device[0].emulate.speed", "above 0"),
        (_pool(emulate={"sped": 1}), "node[0].device[0].emulate.sped", "one of"),
        (_pool(colour="red"), "node[0].device[0].colour", "one of"),
        ({"node": [{"name": "n0", "device": [{"name": "x", "chip": "T4"}, {"name": "x", "chip": "T4"}]}]},
         "node[0].device[1].name", "own name"),
        ({"node": [{"name": "n0", "device": [{"name": "x", "chip": "T4"}]},
                   {"name": "n0", "device": [{"name": "y", "chip": "T4"}]}]}, "node[1].name", "own name"),
        ({**_pool(), "link": [{"nodes": ["n0", "zz"], "bandwidth_gbit_s": 1}]}, "link[0].nodes", "one of"),
        ({**_pool(), "link": [{"nodes": ["n0", "n0"], "bandwidth_gbit_s": -1}]}, "link[0].bandwidth_gbit_s", "above 0"),
    ],
)
def test_bad_pool_names_file_field_and_fix(raw, field, fix):
    with pytest.raises(PoolError) as e:
        pool_from_dict(raw, source="bad.toml")
    msg = str(e.value)
    assert msg.startswith("bad.toml: "), msg
    assert field in msg and "Fix:" in msg and fix in msg, msg


def test_bad_toml_syntax_and_missing_file(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("[[node]\nname=")
    with pytest.raises(PoolError, match="broken.toml: not valid TOML"):
        load_pool(f)
    with pytest.raises(PoolError, match="no such pool file"):
        load_pool(tmp_path / "nope.toml")


def test_cli_pool_show_writes_json(tmp_path):
    from chipfuse.cli import main

    f = tmp_path / "p.toml"
    f.write_text('[[node]]\nname="n"\n[[node.device]]\nname="a"\nchip="H800"\n')
    out = tmp_path / "o.json"
    assert main(["pool", "show", str(f), "--json", str(out)]) == 0
    import json

    assert json.loads(out.read_text())["devices"][0]["chip"] == "H800-SXM"
    assert main(["pool", "show", str(tmp_path / "missing.toml")]) == 2
