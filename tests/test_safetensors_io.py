"""safetensors reader/writer (spec/io.md): layout and dtypes (IO-2), hostile input (IO-3).

The layout is checked by parsing files by hand here (struct + json), not by the code under test.
The fuzz test at the end mutates valid files and counts how each case ended; test_fuzz_summary
prints the counts (run with -s, or see the terminal line it writes past capture)."""
import collections
import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minipeft.errors import CheckpointError, ConfigError
from minipeft.safetensors_io import read_header, read_safetensors, write_safetensors

NUMPY_CODES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
               "I8": "i1", "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4", "U64": "<u8"}
ORDER = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]


def sample(code, shape, rng):
    if code == "BOOL":
        return rng.random(shape) < 0.5
    if code[0] in "FB":  # BF16 arrays are given as float32
        return (rng.standard_normal(shape) * 100).astype(NUMPY_CODES.get(code, "<f4"))
    info = np.iinfo(NUMPY_CODES[code])
    return rng.integers(info.min, info.max, shape, dtype=NUMPY_CODES[code], endpoint=True)


def parse_by_hand(raw: bytes):
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def serialize_by_hand(header, data=b"", pad=True, n=None) -> bytes:
    """A file's bytes: header (dict -> compact JSON, or raw bytes), space padding, data; n: a false length."""
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    h += b" " * (-len(h) % 8 if pad else 0)
    return (len(h) if n is None else n).to_bytes(8, "little") + h + data


@pytest.mark.spec("IO-2")
@pytest.mark.parametrize("code", sorted(NUMPY_CODES))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 3), (4, 5)])
def test_round_trip_each_dtype(tmp_path, rng, code, shape):
    a = sample(code, shape, rng)
    p = tmp_path / "t.safetensors"
    write_safetensors(p, {"w": a}, {"note": "héllo"})
    back, meta = read_safetensors(p)
    assert back["w"].dtype == np.dtype(NUMPY_CODES[code]) and back["w"].shape == shape
    assert back["w"].tobytes() == a.astype(NUMPY_CODES[code]).tobytes()
    assert meta == {"note": "héllo"}
    n, header, data = parse_by_hand(p.read_bytes())
    assert header["w"] == {"dtype": code, "shape": list(shape), "data_offsets": [0, a.nbytes]}
    assert data == a.tobytes()


@pytest.mark.spec("IO-2")
def test_bf16_write_rounds_nearest_even_and_reads_exactly(tmp_path, rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.concatenate([rng.standard_normal(1000).astype(np.float32) * 1e3,
                        np.array([0, -0.0, np.inf, -np.inf, 1 + 2**-8, 1 + 3 * 2**-8, 3e38], np.float32)])
    p = tmp_path / "b.safetensors"
    write_safetensors(p, {"x": x}, dtypes={"x": "BF16"})
    n, header, data = parse_by_hand(p.read_bytes())
    assert header["x"]["dtype"] == "BF16" and len(data) == 2 * x.size
    expect_bits = x.astype(ml_dtypes.bfloat16).view(np.uint16)  # independent rounding
    assert np.array_equal(np.frombuffer(data, "<u2"), expect_bits)
    back, _ = read_safetensors(p)
    assert back["x"].dtype == np.float32
    assert np.array_equal(back["x"], expect_bits.view(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.spec("IO-2")
def test_layout_order_alignment_and_padding(tmp_path, rng):
    names = {f"{code.lower()}.{i}": (code, (i + 1, 3)) for i, code in enumerate(ORDER)}
    tensors = {k: sample(c, s, rng) for k, (c, s) in names.items()}
    p = tmp_path / "t.safetensors"
    write_safetensors(p, tensors, dtypes={"bf16.6": "BF16"})
    raw = p.read_bytes()
    n, header, data = parse_by_hand(raw)
    text = raw[8:8 + n].decode()
    stripped = text.rstrip(" ")  # JSON, then fewer than 8 spaces up to a multiple of 8
    assert n % 8 == 0 and text.startswith("{") and stripped.endswith("}") and len(text) - len(stripped) < 8
    keys = list(header)  # the safetensors package's order: descending dtype rank, then name
    assert keys == sorted(keys, key=lambda k: (-ORDER.index(header[k]["dtype"]), k))
    pos = 0
    for k in keys:
        begin, end = header[k]["data_offsets"]
        itemsize = 2 if header[k]["dtype"] == "BF16" else np.dtype(NUMPY_CODES[header[k]["dtype"]]).itemsize
        assert begin == pos and (8 + n + begin) % itemsize == 0  # each tensor aligned in the file
        pos = end
    assert pos == len(data)
    info, meta = read_header(p)
    assert {k: (v.dtype, list(v.shape)) for k, v in info.items()} == \
        {k: (h["dtype"], h["shape"]) for k, h in header.items()} and meta == {}


@pytest.mark.spec("IO-2")
@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_byte_identical_to_safetensors_package(tmp_path, rng, metadata):
    st_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {f"layer.{i}.{c}": sample(c, (i % 3 + 1, 2), rng) for i, c in enumerate(sorted(NUMPY_CODES))}
    tensors["empty"], tensors["scalar"] = np.zeros((0, 4), np.float32), np.array(2.5, np.float64)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours, tensors, metadata)
    st_numpy.save_file(tensors, str(theirs), metadata=metadata)
    assert ours.read_bytes() == theirs.read_bytes()
    for a, b in [(read_safetensors(theirs)[0], tensors), (st_numpy.load_file(str(ours)), tensors)]:
        assert set(a) == set(b)
        for k in b:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.spec("IO-2")
def test_multi_key_metadata_reads_the_same_both_ways(tmp_path, rng):
    st_numpy = pytest.importorskip("safetensors.numpy")
    meta = {"format": "pt", "b": "2", "a": "ü\n\"x\""}
    tensors = {"w": sample("F32", (3, 4), rng)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours, tensors, meta)
    st_numpy.save_file(tensors, str(theirs), metadata=meta)
    assert read_safetensors(theirs)[1] == meta
    from safetensors import safe_open
    with safe_open(str(ours), "np") as f:
        assert f.metadata() == meta and np.array_equal(f.get_tensor("w"), tensors["w"])


@pytest.mark.oracle
@pytest.mark.spec("IO-2")
def test_bf16_matches_torch(tmp_path, rng):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    x = np.concatenate([rng.standard_normal(4096).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 4096),
                        np.array([0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 3.4e38], np.float32)]).astype(np.float32)
    t = torch.from_numpy(x).to(torch.bfloat16)
    theirs = tmp_path / "theirs.safetensors"
    st_torch.save_file({"x": t}, str(theirs))
    got = read_safetensors(theirs)[0]["x"]
    assert np.array_equal(got.view(np.uint32), t.float().numpy().view(np.uint32))  # exact, NaN bits too
    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, {"x": x}, dtypes={"x": "BF16"})
    back = st_torch.load_file(str(ours))["x"]
    assert back.dtype == torch.bfloat16
    finite = ~np.isnan(x)  # torch writes NaN as 0x7FC0, we keep sign and payload: both are NaN
    assert np.array_equal(back.view(torch.int16).numpy()[finite], t.view(torch.int16).numpy()[finite])
    assert torch.isnan(back.float()[torch.from_numpy(~finite)]).all()


@pytest.mark.spec("IO-2")
@pytest.mark.parametrize("tensors,metadata,dtypes", [
    ({"__metadata__": np.zeros(1)}, None, None), ({"\ud800": np.zeros(1)}, None, None),
    ({"w": np.zeros(1)}, {"n": 1}, None), ({"w": np.zeros(1)}, None, {"v": "BF16"}),
    ({"w": np.zeros(1, np.complex64)}, None, None), ({"w": np.zeros(1, np.int32)}, None, {"w": "BF16"}),
    ({"w": np.zeros(1)}, None, {"w": "F8_E4M3"})])
def test_writer_refuses_what_the_format_cannot_hold(tmp_path, tensors, metadata, dtypes):
    p = tmp_path / "w.safetensors"
    with pytest.raises(ConfigError):
        write_safetensors(p, tensors, metadata, dtypes)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
D8 = bytes(8)
MALFORMED = {  # name: (header, data, length override, key the message must name)
    "shorter_than_8_bytes": (None, b"\x01\x02\x03", None, "header"),
    "header_length_past_eof": ({"a": F32}, D8, 10_000, "header"),
    "header_length_absurd": ({"a": F32}, D8, 2**63 + 5, "header"),
    "header_not_utf8": (b'{"a\xff\xfe":1}   ', b"", None, "header"),
    "header_not_json": (b'{"a": {"dtype": ', b"", None, "header"),
    "header_not_object": (b"[1, 2, 3]", b"", None, "header"),
    "header_json_nan": (b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', D8, None, "header"),
    "header_deeply_nested": (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", None, "header"),
    "duplicate_key": (b'{"a":' + json.dumps(F32).encode() + b',"a":' + json.dumps(F32).encode() + b"}", D8, None, "'a'"),
    "entry_not_object": ({"a": [0, 8]}, D8, None, "'a'"),
    "missing_dtype": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, D8, None, "'a'"),
    "missing_shape": ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, D8, None, "'a'"),
    "missing_data_offsets": ({"a": {"dtype": "F32", "shape": [2]}}, D8, None, "'a'"),
    "unknown_dtype": ({"a": dict(F32, dtype="F128")}, D8, None, "'a'"),
    "dtype_not_string": ({"a": dict(F32, dtype=4)}, D8, None, "'a'"),
    "negative_dim": ({"a": dict(F32, shape=[-2])}, D8, None, "'a'"),
    "float_dim": ({"a": dict(F32, shape=[2.0])}, D8, None, "'a'"),
    "bool_dim": ({"a": dict(F32, shape=[True, 2])}, D8, None, "'a'"),
    "shape_not_list": ({"a": dict(F32, shape=2)}, D8, None, "'a'"),
    "shape_product_overflows_int64": ({"a": dict(F32, shape=[2**62, 2**62, 0 + 4])}, D8, None, "'a'"),
    "shape_larger_than_file": ({"a": dict(F32, shape=[10**12])}, D8, None, "'a'"),
    "too_many_dims": ({"a": dict(F32, shape=[1] * 65 + [2])}, D8, None, "'a'"),
    "offsets_not_shape_times_itemsize": ({"a": dict(F32, shape=[3])}, D8, None, "'a'"),
    "offsets_out_of_range": ({"a": dict(F32, data_offsets=[0, 16], shape=[4])}, D8, None, "'a'"),
    "offsets_negative": ({"a": dict(F32, data_offsets=[-8, 0])}, D8, None, "'a'"),
    "offsets_reversed": ({"a": dict(F32, data_offsets=[8, 0])}, D8, None, "'a'"),
    "offsets_not_pair": ({"a": dict(F32, data_offsets=[0, 8, 8])}, D8, None, "'a'"),
    "offsets_not_int": ({"a": dict(F32, data_offsets=[0, "8"])}, D8, None, "'a'"),
    "overlapping_ranges": ({"a": F32, "b": dict(F32, data_offsets=[4, 12])}, bytes(12), None, "'b'"),
    "gap_between_tensors": ({"a": F32, "b": dict(F32, data_offsets=[12, 20])}, bytes(20), None, "'b'"),
    "gap_at_start": ({"a": dict(F32, data_offsets=[4, 12])}, bytes(12), None, "'a'"),
    "unindexed_tail": ({"a": F32}, bytes(12), None, "header"),
    "metadata_not_object": ({"__metadata__": ["x"], "a": F32}, D8, None, "'__metadata__'"),
    "metadata_value_not_str": ({"__metadata__": {"n": 1}, "a": F32}, D8, None, "'__metadata__.n'"),
    "bool_byte_not_0_or_1": ({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02", None, "'a'"),
    "lone_surrogate_name": (b'{"\\ud800":' + json.dumps(F32).encode() + b"}", D8, None, "\\ud800"),
}


@pytest.mark.spec("IO-3")
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_raises_checkpoint_error(tmp_path, case):
    header, data, n, key = MALFORMED[case]
    p = tmp_path / f"{case}.safetensors"
    p.write_bytes(data if header is None else serialize_by_hand(header, data, pad=False, n=n))
    for reader in (read_safetensors, read_header) if case != "bool_byte_not_0_or_1" else (read_safetensors,):
        with pytest.raises(CheckpointError) as e:
            reader(p)
        msg = str(e.value)
        assert p.name in msg and key in msg and ";" in msg, msg  # file, key, what to do


@pytest.mark.spec("IO-3")
def test_missing_file_is_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        read_safetensors(tmp_path / "nope.safetensors")


# ---- fuzz: mutated valid files load correctly or raise CheckpointError (IO-3) ----------------
# Strategies are built once here (building them per draw dominates the run time); bulk bytes come
# from a seeded NumPy generator, the structure from hypothesis.
OUTCOMES = collections.Counter()  # (mutation, outcome) -> count, printed by test_fuzz_summary
READ_SECONDS = []  # CPU seconds of each read
KINDS = ["truncate", "flip", "rewrite", "random_json", "length", "random_bytes"]
ITEMSIZE = {"BF16": 2, **{c: np.dtype(t).itemsize for c, t in NUMPY_CODES.items()}}
SEED, FRACTION, BYTE = st.integers(0, 2**32 - 1), st.floats(0, 1), st.integers(1, 255)
ENTRIES = st.lists(st.tuples(st.text(st.characters(codec="utf-8"), max_size=6), st.sampled_from(ORDER),
                             st.lists(st.integers(0, 3), max_size=3)), max_size=4, unique_by=lambda e: e[0])
META = st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)


def containers(c):
    return st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=3)


JUNK = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-2, 40) | st.floats()
                    | st.text(max_size=5) | st.sampled_from(ORDER + ["F8_E4M3", "f32", ""]), containers, max_leaves=8)
VALUE = JUNK | st.lists(st.integers(-2, 40), max_size=3) | st.sampled_from(ORDER)
RANDOM_HEADER = st.dictionaries(st.text(max_size=4) | st.just("__metadata__"), JUNK, max_size=4)
FIELD = st.sampled_from(["dtype", "shape", "data_offsets", "entry", "drop", "extra"])
NEW_LENGTH = st.integers(0, 2**64 - 1) | st.integers(-16, 16)


def pick(draw, seq):
    return seq[min(int(draw(FRACTION) * len(seq)), len(seq) - 1)]


def valid_file(draw) -> bytes:
    """A valid file (entries in random order, not sorted) with random bytes as data."""
    entries, meta, gen = draw(ENTRIES), draw(META), np.random.default_rng(draw(SEED))
    header, data = ({} if meta is None else {"__metadata__": meta}), b""
    for name, code, shape in entries:
        if name == "__metadata__":
            continue
        nbytes = int(np.prod(shape)) * ITEMSIZE[code]
        chunk = gen.integers(0, 2 if code == "BOOL" else 256, nbytes, dtype=np.uint8).tobytes()
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [len(data), len(data) + nbytes]}
        data += chunk
    return serialize_by_hand(header, data)


def mutate(draw, kind, raw: bytes) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    if kind == "truncate":
        return raw[:int(draw(FRACTION) * len(raw))]
    if kind == "flip":  # in the length and the header, where the parser lives
        b = bytearray(raw)
        for _ in range(1 + draw(SEED) % 4):
            b[pick(draw, range(min(len(b), 8 + n + 8)))] ^= draw(BYTE)
        return bytes(b)
    if kind == "length":
        new_n = draw(NEW_LENGTH)
        return (new_n if new_n > 16 else max(0, n + new_n)).to_bytes(8, "little") + raw[8:]
    if kind == "random_bytes":
        return np.random.default_rng(draw(SEED)).bytes(draw(SEED) % 65)
    if kind == "random_json":
        return serialize_by_hand(draw(RANDOM_HEADER), raw[8 + n:], pad=draw(st.booleans()))
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]  # rewrite one field of one entry
    key, field, value = pick(draw, sorted(header) + ["__metadata__", "new"]), draw(FIELD), draw(VALUE)
    entry = header.get(key)
    if field == "entry" or not isinstance(entry, dict):
        header[key] = value
    elif field == "drop":
        entry.pop(pick(draw, sorted(entry) or ["x"]), None)
    else:
        entry["x-extra" if field == "extra" else field] = value
    return serialize_by_hand(header, data, pad=draw(st.booleans()))


def check_by_hand(raw, tensors, meta):
    """What a loaded file must give: every header entry, its bytes, its shape (parsed here by hand)."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert meta == header.pop("__metadata__", {})
    assert list(tensors) == list(header)
    for name, h in header.items():
        begin, end = h["data_offsets"]
        chunk, a = raw[8 + n + begin:8 + n + end], tensors[name]
        assert a.shape == tuple(h["shape"]) and len(chunk) == end - begin
        if h["dtype"] == "BF16":
            bits = np.frombuffer(chunk, "<u2").astype(np.uint32) << 16
            assert a.dtype == np.float32 and np.array_equal(a.reshape(-1).view(np.uint32), bits)
        else:
            assert a.dtype == np.dtype(NUMPY_CODES[h["dtype"]]) and a.tobytes() == chunk


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "case.safetensors"


@pytest.mark.spec("IO-3")
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz_mutated_files_load_or_raise_checkpoint_error(fuzz_path, kind, data):
    raw = mutate(data.draw, kind, valid_file(data.draw))
    fuzz_path.write_bytes(raw)
    t0 = time.process_time()  # CPU time: a hang is work without end, not a busy machine
    try:
        tensors, meta = read_safetensors(fuzz_path)
        outcome = "loaded"
    except CheckpointError as e:
        outcome = "CheckpointError"
        assert fuzz_path.name in str(e)
    READ_SECONDS.append(time.process_time() - t0)
    OUTCOMES[kind, outcome] += 1
    if outcome == "loaded":
        check_by_hand(raw, tensors, meta)


@pytest.mark.spec("IO-3")
def test_fuzz_summary(capsys):
    if not OUTCOMES:
        pytest.skip("the fuzz test did not run in this session")
    total = sum(OUTCOMES.values())
    lines = [f"  {kind:13s} {outcome:16s} {count}" for (kind, outcome), count in sorted(OUTCOMES.items())]
    with capsys.disabled():
        print(f"\nIO-3 fuzz: {total} cases, read CPU time median {np.median(READ_SECONDS) * 1e3:.2f} ms, "
              f"max {max(READ_SECONDS) * 1e3:.1f} ms\n" + "\n".join(lines))
    assert total >= 1000  # the read times are reported, not asserted: no clock limits in unit tests
