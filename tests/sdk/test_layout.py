"""The model's layout in its spec (issue #17): track() records each table's parameter and
a dense one's shape; binding and loading find parameters by it (ekko.serving.layout)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekko.core.errors import ProtocolError, UsageError
from ekko.core.spec import ModelSpec, TableSpec
from ekko.sdk.tracking import DENSE_CHUNK, spec_from_module
from ekko.serving import layout


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.user = nn.Embedding(50, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))


def test_track_records_each_parameter_and_dense_shapes_on_the_wire():
    spec = spec_from_module(Net(), "m")
    got = {t.name: (t.param, t.shape, t.dense) for t in spec.tables}
    assert got == {"user": ("user.weight", (), False), "mlp_0_weight": ("mlp.0.weight", (3, 4), True),
                   "mlp_0_bias": ("mlp.0.bias", (3,), True), "mlp_2_weight": ("mlp.2.weight", (1, 3), True),
                   "mlp_2_bias": ("mlp.2.bias", (1,), True)}
    assert ModelSpec.from_dict(spec.to_dict()) == spec                       # the layout survives the wire
    plain = TableSpec("t", rows=2, dim=3)
    assert "param" not in plain.to_dict() and "shape" not in plain.to_dict()  # as before without one


def test_a_spec_without_layout_is_the_same_model():
    spec = spec_from_module(Net(), "m")
    bare = ModelSpec("m", tuple(t.without_layout() for t in spec.tables))
    assert bare != spec and bare.same_tables(spec) and spec.same_tables(bare)
    other = ModelSpec("m", tuple(t.without_layout() for t in spec.tables[:-1]))
    assert not other.same_tables(spec)


@pytest.mark.parametrize("kw, words", [
    ({"param": "a b"}, "param"), ({"param": "x" * 300}, "param"),
    ({"shape": (2, -1), "dense": True}, "shape"), ({"shape": [2, 3], "dense": True}, "shape"),
    ({"shape": (100,), "dense": True}, "fill"), ({"shape": (3, 3)}, "rows, dim"),
])
def test_bad_layouts_are_refused(kw, words):
    with pytest.raises(UsageError, match=words):
        TableSpec("t", rows=2, dim=DENSE_CHUNK if kw.get("dense") else 3, **kw)


def test_from_dict_refuses_a_bad_shape():
    with pytest.raises(ProtocolError):
        TableSpec.from_dict({"name": "t", "rows": 1, "dim": 3, "dense": True, "shape": "3"})


def test_plan_follows_the_layout_not_the_names():
    spec = spec_from_module(Net(), "m")
    # rename every table: the layout still says which parameter each one holds
    renamed = ModelSpec("m", tuple(TableSpec(f"t{i}", t.rows, t.dim, t.dtype, t.shards, t.dense, t.param, t.shape)
                                   for i, t in enumerate(spec.tables)))
    got = {p.param_name: p.table for p in layout.plan(Net(), renamed)}
    assert got == {"user.weight": "t0", "mlp.0.weight": "t1", "mlp.0.bias": "t2", "mlp.2.weight": "t3",
                   "mlp.2.bias": "t4"}
    bigger = Net()
    bigger.extra = nn.Linear(2, 2)
    with pytest.raises(UsageError, match="extra.weight"):
        layout.plan(bigger, renamed)
    wrong = Net()
    wrong.mlp[0] = nn.Linear(4, 2)
    with pytest.raises(UsageError, match="mlp.0.weight"):
        layout.plan(wrong, renamed)


def test_bind_ties_every_alias_of_a_shared_weight():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Embedding(10, 2)
            self.b = nn.Embedding(10, 2)
            self.b.weight = self.a.weight
    net = Tied()
    spec = spec_from_module(net, "m")
    store = {t.name: torch.full((t.rows, t.dim), float(i + 1)) for i, t in enumerate(spec.tables)}
    tables = layout.bind(net, layout.plan(net, spec), store.__getitem__)
    assert tables == ["a"] and net.a.weight is net.b.weight
    assert net.b.weight.data_ptr() == store["a"].data_ptr()
