"""Model and table specifications and the shard function.

A model is a set of tables.  Embedding tables are ``rows x dim``; dense
parameters are tables too (one row per fixed-size chunk of the flattened
parameter), so sparse and dense updates share one versioning scheme and a
replica never serves new embeddings with an old MLP unknowingly.

Sharding is by contiguous row ranges: ``shard(row) = row // shard_rows``.  It is
fixed and documented because every replica must agree on it without talking.

A *hashed* table (``keys="int64"``) names its rows by arbitrary 64-bit feature keys.
Its ``capacity`` slots are rows like any other table's (versions, shards, knowledge and
rollback work on slots unchanged); a key lives in the slot region of shard
``key_shard(key) = mix64(key) % shards`` (:func:`ekko.core.hash64.mix64`, the splitmix64
finalizer), and each stored row carries its key after its ``dim`` values (``key_cols``
elements holding the key's 8 bytes, see :mod:`ekko.core.hashed`), so every path that
moves rows moves a row's key with it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ekko.core.errors import ProtocolError, UsageError
from ekko.core.hash64 import mix64

#: dtypes a table may hold (names as numpy spells them).
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "float64")
#: bytes per element of each supported dtype.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
#: names of models and tables: short, printable, safe in URLs and file names.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
#: longest parameter name a table's layout records.
MAX_PARAM_CHARS = 256
#: a parameter's qualified name in a layout (empty: none recorded).
PARAM_RE = re.compile(r"[A-Za-z0-9_.]{0,%d}" % MAX_PARAM_CHARS)
#: most dimensions of a dense parameter's shape in a layout.
MAX_SHAPE_DIMS = 8
#: largest table a spec may declare (rows) -- guards memory on every replica.
MAX_TABLE_ROWS = 1 << 31
#: widest row a spec may declare (elements).
MAX_ROW_DIM = 1 << 16
#: most tables per model.
MAX_TABLES_PER_MODEL = 1024
#: most shards per table.
MAX_SHARDS_PER_TABLE = 1 << 16
#: default rows per shard when a table does not say how many shards it wants.
DEFAULT_SHARD_ROWS = 1 << 14
#: how a table names its rows: dense indices below ``rows``, or 64-bit keys (hashed).
KEY_KINDS = ("dense", "int64")
#: what a hashed table does when a key arrives for a full shard region.
EVICTION_POLICIES = ("lru", "lfu", "none")
#: most holders per shard and DC a placed model may ask for (``replicas_per_shard``).
MAX_REPLICAS_PER_SHARD = 64


def check_name(kind: str, name: str, error: type[Exception] = UsageError) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise error(f"invalid {kind} name {name!r}: use 1-64 chars of [A-Za-z0-9_.-]")
    return name


@dataclass(frozen=True, slots=True)
class TableSpec:
    """One table of a model: ``rows x dim`` values of one dtype.

    Args:
        name: table name, unique within the model.
        rows: number of rows.
        dim: elements per row.
        dtype: one of :data:`SUPPORTED_DTYPES`.
        shards: number of shards; default ``ceil(rows / DEFAULT_SHARD_ROWS)``.
        dense: True when the table holds chunks of a dense parameter.
        param: the layout: the module parameter the table holds (its qualified name,
            ``"mlp.0.weight"``; ``""``: not recorded).  The publisher's ``track()`` records
            it, so a serving process binds or loads a module with no naming convention.
        shape: the layout of a dense table: the parameter's shape (its elements row-major
            over the rows, the last row zero-padded; ``()``: not recorded).
        keys: ``"dense"`` (rows are ``0..rows-1``) or ``"int64"``: a hashed table whose
            rows are named by 64-bit keys, held in ``capacity`` slots (``rows`` is then
            ``capacity``; give either).
        capacity: slots of a hashed table (its memory bound).
        eviction: a hashed table's policy when a key needs a slot in a full shard region
            (``"lru"``, ``"lfu"``; ``"none"``: the publish is refused).

    Example:
        >>> t = TableSpec("user_emb", rows=1000, dim=16)
        >>> t.shard_of(999), t.num_shards
        (0, 1)
        >>> TableSpec("mlp_0_weight", rows=1, dim=6, dense=True, param="mlp.0.weight", shape=(2, 3)).shape
        (2, 3)
        >>> h = TableSpec("ads", dim=8, keys="int64", capacity=1 << 16, eviction="lru")
        >>> h.rows, h.num_shards, h.width, h.key_shards([10**15, -3]).tolist()
        (65536, 4, 10, [2, 3])
    """

    name: str
    rows: int = 0
    dim: int = 0
    dtype: str = "float32"
    shards: int | None = None
    dense: bool = False
    param: str = ""
    shape: tuple[int, ...] = ()
    keys: str = "dense"
    capacity: int | None = None
    eviction: str = "none"

    def __post_init__(self) -> None:
        check_name("table", self.name)
        if self.keys not in KEY_KINDS:
            raise UsageError(f"table {self.name}: keys must be one of {KEY_KINDS}, got {self.keys!r}")
        if self.keys == "int64":
            cap = self.capacity if self.capacity is not None else self.rows
            if self.rows and self.rows != cap:
                raise UsageError(f"table {self.name}: a hashed table's rows are its capacity "
                                 f"(rows={self.rows}, capacity={self.capacity})")
            if self.dense:
                raise UsageError(f"table {self.name}: a dense parameter's table cannot be hashed")
            object.__setattr__(self, "rows", cap)
            object.__setattr__(self, "capacity", cap)
            if self.eviction not in EVICTION_POLICIES:
                raise UsageError(f"table {self.name}: eviction must be one of {EVICTION_POLICIES}, "
                                 f"got {self.eviction!r}")
        elif self.capacity is not None or self.eviction != "none":
            raise UsageError(f"table {self.name}: capacity and eviction are for hashed tables (keys='int64')")
        if not isinstance(self.rows, int) or not 0 < self.rows <= MAX_TABLE_ROWS:
            raise UsageError(f"table {self.name}: rows must be in 1..{MAX_TABLE_ROWS}, got {self.rows!r}")
        if not isinstance(self.dim, int) or not 0 < self.dim <= MAX_ROW_DIM:
            raise UsageError(f"table {self.name}: dim must be in 1..{MAX_ROW_DIM}, got {self.dim!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise UsageError(f"table {self.name}: dtype {self.dtype!r} not in {SUPPORTED_DTYPES}")
        if self.shards is None:
            object.__setattr__(self, "shards", max(1, math.ceil(self.rows / DEFAULT_SHARD_ROWS)))
        if not isinstance(self.shards, int) or not 0 < self.shards <= min(self.rows, MAX_SHARDS_PER_TABLE):
            raise UsageError(f"table {self.name}: shards must be in 1..min(rows, {MAX_SHARDS_PER_TABLE})")
        if self.hashed and (self.shards - 1) * self.shard_rows >= self.rows:
            # Every key hashes to some shard: no shard's slot region may be empty.
            raise UsageError(f"table {self.name}: {self.shards} shards leave some without slots in a capacity "
                             f"of {self.rows}; use fewer shards")
        if not isinstance(self.param, str) or not PARAM_RE.fullmatch(self.param):
            raise UsageError(f"table {self.name}: param must be a parameter's qualified name "
                             f"(0-{MAX_PARAM_CHARS} chars of [A-Za-z0-9_.]), got {self.param!r}")
        shape = self.shape
        if not isinstance(shape, tuple) or len(shape) > MAX_SHAPE_DIMS or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
            raise UsageError(f"table {self.name}: shape must be up to {MAX_SHAPE_DIMS} positive ints, got {shape!r}")
        if shape:
            numel = math.prod(shape)
            if self.dense and not (self.rows - 1) * self.dim < numel <= self.rows * self.dim:
                raise UsageError(f"table {self.name}: shape {shape} does not fill {self.rows} rows of {self.dim}")
            if not self.dense and shape != (self.rows, self.dim):
                raise UsageError(f"table {self.name}: an embedding table's shape is (rows, dim), got {shape}")

    def without_layout(self) -> "TableSpec":
        """The same table with no layout recorded (``param``, ``shape``)."""
        return TableSpec(self.name, self.rows, self.dim, self.dtype, self.shards, self.dense,
                         keys=self.keys, capacity=self.capacity, eviction=self.eviction)

    @property
    def num_shards(self) -> int:
        return int(self.shards)  # type: ignore[arg-type]

    @property
    def hashed(self) -> bool:
        """Whether rows are named by 64-bit keys (``keys="int64"``)."""
        return self.keys == "int64"

    @property
    def key_cols(self) -> int:
        """Elements after a hashed table's ``dim`` values that hold its key (0: dense ids)."""
        return 8 // DTYPE_BYTES[self.dtype] if self.hashed else 0

    @property
    def width(self) -> int:
        """Elements of one stored row: ``dim``, and a hashed table's key columns."""
        return self.dim + self.key_cols

    def key_shards(self, keys: Any) -> np.ndarray:
        """The shard of each key of a hashed table: ``mix64(key) % shards`` (int64)."""
        k = np.asarray(keys, dtype=np.int64)
        return (mix64(k.view(np.uint64)) % np.uint64(self.num_shards)).astype(np.int64)

    @property
    def shard_rows(self) -> int:
        """Rows per shard (the last shard may be shorter)."""
        return math.ceil(self.rows / self.num_shards)

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row (a hashed table's key included)."""
        return self.width * DTYPE_BYTES[self.dtype]

    def shard_of(self, row: int) -> int:
        return row // self.shard_rows

    def shards_of(self, rows: np.ndarray) -> np.ndarray:
        """Vectorized shard function: ``rows // shard_rows`` (int64)."""
        return np.asarray(rows, dtype=np.int64) // self.shard_rows

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Half-open row range ``[lo, hi)`` of a shard (empty for trailing shards when
        ``shards`` does not divide ``rows`` evenly: rows=10, shards=7 leaves shards 5-6 empty)."""
        lo = min(self.rows, shard * self.shard_rows)
        return lo, min(self.rows, lo + self.shard_rows)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "rows": self.rows, "dim": self.dim, "dtype": self.dtype,
                             "shards": self.shards, "dense": self.dense}
        if self.param:   # only when recorded: a spec without layout encodes as before
            d["param"] = self.param
        if self.shape:
            d["shape"] = list(self.shape)
        if self.hashed:  # only then: a dense table encodes as before
            d["keys"], d["eviction"] = self.keys, self.eviction
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "TableSpec":
        """Build from a decoded message; bad input raises :class:`ProtocolError`."""
        try:
            shape = d.get("shape", ())
            if not isinstance(shape, (list, tuple)):
                raise TypeError("shape must be a list")
            return cls(name=d["name"], rows=d["rows"], dim=d["dim"], dtype=d.get("dtype", "float32"),
                       shards=d.get("shards"), dense=bool(d.get("dense", False)), param=d.get("param", ""),
                       shape=tuple(shape), keys=d.get("keys", "dense"),
                       eviction=d.get("eviction", "none"))
        except (KeyError, TypeError, AttributeError, UsageError) as e:
            raise ProtocolError(f"bad table spec: {e}", "bad_spec") from None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model: a name, its tables and its share of inference traffic.

    Args:
        name: model name.
        tables: the tables (embedding tables and dense-parameter tables).
        traffic_share: fraction of inference traffic this model serves (the
            scheduler's ``p_m``), in (0, 1].
        replicas_per_shard: placement across a DC (issue #18): in every DC, each shard
            of an embedding table lives on this many members, chosen by rendezvous
            hashing (:mod:`p2p.placement`); 0 (the default): every replica holds every
            shard.  Dense-parameter tables are always held everywhere (every serving
            replica computes with them).

    Example:
        >>> m = ModelSpec("ranker", tables=[TableSpec("emb", rows=100, dim=8)])
        >>> m.table("emb").dim, m.placed
        (8, False)
        >>> ModelSpec("big", [TableSpec("emb", rows=100, dim=8)], replicas_per_shard=1).to_dict()["replicas_per_shard"]
        1
    """

    name: str
    tables: tuple[TableSpec, ...] = field(default_factory=tuple)
    traffic_share: float = 1.0
    replicas_per_shard: int = 0

    def __post_init__(self) -> None:
        check_name("model", self.name)
        tables = tuple(self.tables)
        object.__setattr__(self, "tables", tables)
        if not tables:
            raise UsageError(f"model {self.name}: needs at least one table")
        if len(tables) > MAX_TABLES_PER_MODEL:
            raise UsageError(f"model {self.name}: at most {MAX_TABLES_PER_MODEL} tables")
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise UsageError(f"model {self.name}: duplicate table names")
        if not (isinstance(self.traffic_share, (int, float)) and 0 < self.traffic_share <= 1):
            raise UsageError(f"model {self.name}: traffic_share must be in (0, 1]")
        r = self.replicas_per_shard
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= MAX_REPLICAS_PER_SHARD:
            raise UsageError(f"model {self.name}: replicas_per_shard must be an int in "
                             f"0..{MAX_REPLICAS_PER_SHARD} (0: every replica holds every shard), got {r!r}")

    @property
    def placed(self) -> bool:
        """Whether the model's embedding tables are partitioned across a DC's members."""
        return self.replicas_per_shard > 0

    def placed_table(self, name: str) -> bool:
        """Whether this table's shards live on ``replicas_per_shard`` members per DC
        (False for a dense-parameter table, which every replica holds)."""
        return self.placed and not self.table(name).dense

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise UsageError(f"model {self.name} has no table {name!r}")

    def has_table(self, name: str) -> bool:
        return any(t.name == name for t in self.tables)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "tables": [t.to_dict() for t in self.tables],
                             "traffic_share": self.traffic_share}
        if self.replicas_per_shard:   # only when placed: a replicated model encodes as before
            d["replicas_per_shard"] = self.replicas_per_shard
        return d

    def same_tables(self, other: "ModelSpec") -> bool:
        """Equal but for the layout (``param``, ``shape``), which one of them may lack: a
        model registered before layouts were recorded is the same model."""
        return (self.name == other.name and self.traffic_share == other.traffic_share
                and self.replicas_per_shard == other.replicas_per_shard
                and [t.without_layout() for t in self.tables] == [t.without_layout() for t in other.tables])

    @classmethod
    def from_dict(cls, d: Any) -> "ModelSpec":
        """Build from a decoded message; bad input raises :class:`ProtocolError`."""
        try:
            tables = d["tables"]
            if not isinstance(tables, list):
                raise TypeError("tables must be a list")
            return cls(name=d["name"], tables=tuple(TableSpec.from_dict(t) for t in tables),
                       traffic_share=float(d.get("traffic_share", 1.0)),
                       replicas_per_shard=d.get("replicas_per_shard", 0))
        except (KeyError, TypeError, AttributeError, ValueError, UsageError) as e:
            if isinstance(e, ProtocolError):
                raise
            raise ProtocolError(f"bad model spec: {e}", "bad_spec") from None
