"""Pool files that declare their own chips, wire their nodes and give size-dependent links (cluster.chips,
cluster.wiring), and every refusal of a bad new field."""

import copy

import pytest

from chipfuse.cluster.catalog import get_chip
from chipfuse.cluster.pool import load_pool, pool_from_dict
from chipfuse.cluster.wiring import NO_P2P_FACTOR, PCIE_GBS
from chipfuse.errors import PoolError
from chipfuse.plan.hardware import PoolIndex

NEW_CHIPS = ["RTX-2080", "RTX-2080-Ti", "TITAN-RTX", "V100-SXM2-16GB", "V100-PCIe-16GB", "A10", "A30", "A40",
             "RTX-A6000", "L20", "H200", "B200", "MI210", "Gaudi3", "Ascend-910C", "MTT-S4000"]

POOL = '''
name = "lab"
[[chip]]
name = "GTX-1080-Ti"
vendor = "nvidia"
memory_gib = 11
tflops_bf16 = 11.3
tflops_fp32 = 11.3
mem_bw_gbs = 484
link_gbs = 12
bf16 = false
tensor_cores = false
source = "https://www.nvidia.com/en-gb/geforce/graphics-cards/geforce-gtx-1080-ti/specifications/"

[[node]]
name = "box"
[[node.device]]
name = "g"
chip = "RTX-2080-Ti"
count = 8
[node.wiring]
pcie_gen = 3
p2p = false
bridges = [["g0", "g1"], ["g2", "g3"]]
bridge_gbs = 50
switches = [["g0", "g1", "g2", "g3"], ["g4", "g5", "g6", "g7"]]
nic_gbit_s = 10

[[node]]
name = "old"
[[node.device]]
name = "p"
chip = "GTX-1080-Ti"
count = 2

[[link]]
nodes = ["box", "old"]
bandwidth_gbit_s = 25
latency_ms = 0.05
by_size = [[65536, 2.0], [67108864, 20.0]]
'''


def test_catalog_has_the_cards_people_have():
    for name in NEW_CHIPS:
        chip = get_chip(name)
        assert chip.source, name
        assert chip.flops_bf16 >= chip.flops_fp32 > 0
    assert not get_chip("RTX-2080-Ti").has_bf16 and not get_chip("V100-SXM2-16GB").has_bf16
    assert get_chip("V100-SXM2-16GB").memory_bytes == 16 * 1024**3
    assert get_chip("H20").name == "H20"  # a prefix of H200 still finds itself


def test_pool_declares_chip_wiring_and_sized_links(tmp_path):
    f = tmp_path / "lab.toml"
    f.write_text(POOL)
    pool = load_pool(f)
    p0 = pool.device("p0")
    assert p0.chip.name == "GTX-1080-Ti" and not p0.chip.tensor_cores and p0.chip.source.startswith("https://")
    box = pool.nodes[0]
    ix = PoolIndex(pool)
    pcie = PCIE_GBS[3] * 1e9
    # A bridged pair talks over its bridge only.
    assert box.group_link(("g0", "g1"))[0] == pytest.approx(50e9)
    # Two devices of one switch without peer-to-peer: staged through host memory, one edge each way
    # leaving the switch per sender.
    assert ix.hw(("g0", "g2")).intra_bw == pytest.approx(pcie * NO_P2P_FACTOR)
    # Four devices on one switch, two bridged pairs: the two unbridged ring edges leave the switch.
    assert box.group_link(("g0", "g1", "g2", "g3"))[0] == pytest.approx(pcie * NO_P2P_FACTOR / 2)
    # Eight devices: the second switch has no bridges, its four devices all send through its uplink.
    assert box.intra_bandwidth == pytest.approx(pcie * NO_P2P_FACTOR / 4)
    assert box.group_link(("g0", "g2"))[1] > box.intra_latency_s  # host staging adds latency
    # The link's bandwidth depends on the message size, and the box's 10 Gbit/s NIC caps it.
    ln = pool.link("box", "old")
    assert ln.bandwidth_at(65536) == pytest.approx(2e9 / 8)
    assert ln.bandwidth_at(1 << 30) == pytest.approx(20e9 / 8)
    assert 2e9 / 8 < ln.bandwidth_at(2 << 20) < 20e9 / 8
    assert ix.link("box", "old")[0] == pytest.approx(10e9 / 8)
    assert ix.link("box", "old", nbytes=65536)[0] == pytest.approx(2e9 / 8)


def _raw():
    import tomllib

    return tomllib.loads(POOL)


def _set(path, value):
    raw = _raw()
    cur = raw
    for k in path[:-1]:
        cur = cur[k]
    if value is KeyError:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return raw


@pytest.mark.parametrize("path,value,field,fix", [
    (("chip", 0, "tflops_fp32"), -1, "chip[0].tflops_fp32", "positive"),
    (("chip", 0, "source"), KeyError, "chip[0].source", "source = "),
    (("chip", 0, "vendor"), "nvidai", "chip[0].vendor", "use one of"),
    (("chip", 0, "name"), "A100", "chip[0].name", "another name"),
    (("chip", 0, "tflops_bf16"), 1.0, "chip[0].tflops_fp32", "16-bit"),
    (("chip", 0, "bf16"), "no", "chip[0].bf16", "true"),
    (("chip", 0, "clock"), 1.5, "chip[0].clock", "use one of"),
    (("node", 0, "wiring", "pcie_gen"), 7, "node[0].wiring.pcie_gen", "use one of"),
    (("node", 0, "wiring", "p2p"), 1, "node[0].wiring.p2p", "true"),
    (("node", 0, "wiring", "bridges"), [["g0", "g9"]], "node[0].wiring.bridges", "expanded"),
    (("node", 0, "wiring", "bridges"), [["g0", "g1", "g2"]], "node[0].wiring.bridges", "pairs"),
    (("node", 0, "wiring", "bridges"), [["g0", "g1"], ["g1", "g2"]], "node[0].wiring.bridges", "at most once"),
    (("node", 0, "wiring", "bridges"), [["g0", ["g1"]]], "node[0].wiring.bridges", "as strings"),
    (("node", 0, "wiring", "bridges"), [["g0", {"a": 1}]], "node[0].wiring.bridges", "as strings"),
    (("node", 0, "wiring", "bridge_gbs"), KeyError, "node[0].wiring.bridge_gbs", "bridge_gbs ="),
    (("node", 0, "wiring", "switches"), "g0", "node[0].wiring.switches", "switches ="),
    (("node", 0, "wiring", "nic_gbit_s"), 0, "node[0].wiring.nic_gbit_s", "above 0"),
    (("node", 0, "wiring", "nvlink"), True, "node[0].wiring.nvlink", "use one of"),
    (("node", 0, "wiring"), 3, "node[0].wiring", "[node.wiring]"),
    (("link", 0, "by_size"), [[65536, 2.0]], "link[0].by_size", "at least two"),
    (("link", 0, "by_size"), [[65536, 2.0], [1024, 3.0]], "link[0].by_size[1][0]", "increasing"),
    (("link", 0, "by_size"), [[65536, 2.0], [131072, -3.0]], "link[0].by_size[1][1]", "above 0"),
    (("node", 1, "device", 0, "chip"), "GTX-1070", "node[1].device[0].chip", "[[chip]]"),
])
def test_bad_new_fields_name_file_field_and_fix(path, value, field, fix):
    raw = _set(path, value)
    with pytest.raises(PoolError) as e:
        pool_from_dict(copy.deepcopy(raw), source="lab.toml")
    msg = str(e.value)
    assert msg.startswith("lab.toml: ") and f" {field}:" in msg and "Fix:" in msg and fix in msg, msg
