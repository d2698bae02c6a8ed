#!/usr/bin/env python3
"""The Python `gguf` package (gguf-py, pinned in scripts/requirements-test.txt)
as the other side of the interop test in python_interop.rs.

    gguf_interop.py write CASE OUT.gguf   write OUT.gguf with gguf.GGUFWriter and
                                          print a JSON description of what was written
    gguf_interop.py read IN.gguf          read IN.gguf with gguf.GGUFReader and print
                                          a JSON description of what it found

Both descriptions have the same shape, so the Rust side compares them with one
function:

    {"gguf_py": "0.19.0", "version": 3, "alignment": 32, "data_offset": 1234 or null,
     "metadata": [{"key": K, "value": V}, ...]            # in file order
     "tensors": [{"name": N, "type": "Q4_K", "type_id": 12, "dims": [ggml order],
                  "n_bytes": B, "offset": O or null, "data": "hex"}, ...]}

A value V is tagged with its GGUF type: {"type": "u32", "value": 7},
{"type": "f32", "bits": 1069547520} (floats as their bit pattern, so NaN, -0.0
and rounding compare exactly), {"type": "string", "value": "..."},
{"type": "array", "elem": "u8", "items": [V, ...]}.
"""

import json
import struct
import sys
from importlib.metadata import version as package_version

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

TYPE_NAMES = {
    GGUFValueType.UINT8: "u8",
    GGUFValueType.INT8: "i8",
    GGUFValueType.UINT16: "u16",
    GGUFValueType.INT16: "i16",
    GGUFValueType.UINT32: "u32",
    GGUFValueType.INT32: "i32",
    GGUFValueType.FLOAT32: "f32",
    GGUFValueType.BOOL: "bool",
    GGUFValueType.STRING: "string",
    GGUFValueType.ARRAY: "array",
    GGUFValueType.UINT64: "u64",
    GGUFValueType.INT64: "i64",
    GGUFValueType.FLOAT64: "f64",
}
FLOAT_BITS = {GGUFValueType.FLOAT32: ("<f", "<I"), GGUFValueType.FLOAT64: ("<d", "<Q")}


# ---------------------------------------------------------------------------
# Writing


def tagged(value, vtype, sub_type=None):
    """The description of a value as GGUFWriter._pack_val will encode it."""
    vtype = GGUFValueType(vtype)
    name = TYPE_NAMES[vtype]
    if vtype in FLOAT_BITS:
        float_fmt, int_fmt = FLOAT_BITS[vtype]
        return {"type": name, "bits": struct.unpack(int_fmt, struct.pack(float_fmt, value))[0]}
    if vtype == GGUFValueType.BOOL:
        return {"type": name, "value": bool(value)}
    if vtype == GGUFValueType.STRING:
        return {"type": name, "value": value if isinstance(value, str) else value.decode("utf-8")}
    if vtype == GGUFValueType.ARRAY:
        # The same rule as GGUFWriter._pack_val: an explicit sub_type, else
        # the type of the first element (nested lists pick their own).
        elem = sub_type if sub_type is not None else GGUFValueType.get_type(value[0])
        return {"type": name, "elem": TYPE_NAMES[elem], "items": [tagged(v, elem) for v in value]}
    return {"type": name, "value": int(value)}


def add_all_value_types(w):
    """Every scalar type, with the extremes of each, and arrays of every type."""
    w.add_uint8("v.u8", 255)
    w.add_int8("v.i8", -128)
    w.add_uint16("v.u16", 65535)
    w.add_int16("v.i16", -32768)
    w.add_uint32("v.u32", 4294967295)
    w.add_int32("v.i32", -2147483648)
    w.add_float32("v.f32", 1.5e-5)
    w.add_float32("v.f32_nan", float("nan"))
    w.add_float32("v.f32_neg_zero", -0.0)
    w.add_float32("v.f32_inf", float("-inf"))
    w.add_uint64("v.u64", 2**64 - 1)
    w.add_int64("v.i64", -(2**63))
    w.add_float64("v.f64", -2.0**-1074)  # the smallest subnormal
    w.add_bool("v.bool_true", True)
    w.add_bool("v.bool_false", False)
    w.add_string("v.string", "héllo\n\t{{ bos_token }} 日本語 🦀 \"quoted\" \\")
    # add_string drops empty strings; add_key_value writes them.
    w.add_key_value("v.string_empty", "", GGUFValueType.STRING)
    w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")

    arrays = {
        GGUFValueType.UINT8: [0, 1, 255],
        GGUFValueType.INT8: [-128, 0, 127],
        GGUFValueType.UINT16: [0, 65535],
        GGUFValueType.INT16: [-32768, 32767],
        GGUFValueType.UINT32: [0, 4294967295],
        GGUFValueType.INT32: [-2147483648, 2147483647],
        GGUFValueType.FLOAT32: [0.25, -8.0, float("inf"), 3.4028234663852886e38],
        GGUFValueType.BOOL: [True, False, True],
        GGUFValueType.UINT64: [0, 2**64 - 1],
        GGUFValueType.INT64: [-(2**63), 2**63 - 1],
        GGUFValueType.FLOAT64: [1e300, -0.0, 5e-324],
    }
    for vtype, values in arrays.items():
        w.add_key_value(f"a.{TYPE_NAMES[vtype]}", values, GGUFValueType.ARRAY, sub_type=vtype)
    # Type inferred from the elements, as the converters use add_array.
    w.add_array("a.inferred_i32", [1, -2, 3])
    w.add_array("a.inferred_f32", [0.5, 1.0])
    # A vocabulary-like string array: empty, byte-level, multi-byte and long entries.
    tokens = ["<s>", "</s>", "", "Ġthe", "é", "日本", "🦀", "\n", "a" * 300]
    tokens += [f"tok{i}" for i in range(1000)]
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_key_value("tokenizer.ggml.scores", [float(-i) for i in range(len(tokens))],
                    GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    w.add_key_value("tokenizer.ggml.token_type", [1] * len(tokens),
                    GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    # Nested arrays: GGUFWriter infers each inner array's type from its own
    # first element, so inner arrays of different types are possible.
    w.add_array("a.nested_i32", [[1, 2], [3], [-4, 5, 6]])
    w.add_array("a.nested_mixed", [["x", "yz"], [1.5], [True, False]])
    w.add_array("a.nested_deep", [[[1], [2, 3]], [["deep"]]])


def random_bytes(rng, n):
    return rng.integers(0, 256, size=n, dtype=np.uint8)


def add_tensors(w, rng):
    """Plain numpy tensors of every scalar type and raw bytes of quantized ones."""
    w.add_tensor("t.f32", rng.standard_normal((3, 5), dtype=np.float32))
    w.add_tensor("t.f16", rng.standard_normal((7,)).astype(np.float16))
    w.add_tensor("t.f64", rng.standard_normal((2, 2, 3)))
    w.add_tensor("t.i8", rng.integers(-128, 128, size=(4, 3), dtype=np.int8))
    w.add_tensor("t.i16", rng.integers(-30000, 30000, size=(5,), dtype=np.int16))
    w.add_tensor("t.i32", rng.integers(-(2**31), 2**31, size=(2, 3), dtype=np.int32))
    w.add_tensor("t.i64", rng.integers(-(2**62), 2**62, size=(1, 1, 2, 3), dtype=np.int64))
    # Quantized tensors are handed over as their raw bytes with a byte shape
    # (rows × bytes per row); GGUFWriter turns it into an element shape.
    quantized = [
        ("t.q4_0", GGMLQuantizationType.Q4_0, (2, 3)),      # 2 rows of 3 blocks
        ("t.q8_0", GGMLQuantizationType.Q8_0, (3, 1)),
        ("t.q4_k", GGMLQuantizationType.Q4_K, (2, 2)),
        ("t.q6_k", GGMLQuantizationType.Q6_K, (1, 1)),
        ("t.q5_k", GGMLQuantizationType.Q5_K, (2, 3, 1)),   # three dimensions
        ("t.iq2_xxs", GGMLQuantizationType.IQ2_XXS, (1, 2)),
        ("t.mxfp4", GGMLQuantizationType.MXFP4, (4, 2)),
        ("t.bf16", GGMLQuantizationType.BF16, (2, 5)),
    ]
    for name, qtype, (*rows, blocks) in quantized:
        _, type_size = GGML_QUANT_SIZES[qtype]
        data = random_bytes(rng, int(np.prod(rows)) * blocks * type_size).reshape((*rows, blocks * type_size))
        w.add_tensor(name, data, raw_dtype=qtype)


def case_all_types(w, rng):
    add_all_value_types(w)
    add_tensors(w, rng)


def case_aligned(w, rng):
    # Odd tensor sizes, so that every tensor needs padding to the alignment.
    w.add_custom_alignment(128)
    w.add_uint32("test.case", 2)
    w.add_tensor("odd.a", np.arange(3, dtype=np.int8))
    w.add_tensor("odd.b", rng.standard_normal((5,)).astype(np.float16))
    w.add_tensor("odd.q", random_bytes(rng, 34).reshape((1, 34)), raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("odd.c", rng.standard_normal((1, 1)).astype(np.float32))


def case_no_tensors(w, rng):
    w.add_string("general.name", "metadata only")


CASES = {"all_types": case_all_types, "aligned": case_aligned, "no_tensors": case_no_tensors}


def write(case, path):
    rng = np.random.default_rng(20240917)
    w = GGUFWriter(path, arch="interop")
    CASES[case](w, rng)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    # The writer forgets each tensor as it writes it: describe them first.
    tensors = []
    for name, ti in w.tensors[0].items():
        qtype = GGMLQuantizationType(ti.dtype)
        tensors.append({
            "name": name,
            "type": qtype.name,
            "type_id": int(qtype),
            # ti.shape is numpy order (rows last-major); ggml lists the row length first.
            "dims": [int(d) for d in reversed(ti.shape)],
            "n_bytes": int(ti.nbytes),
            "offset": None,
            "data": ti.tensor.tobytes().hex(),
        })
    w.write_tensors_to_file()
    w.close()
    return {
        "gguf_py": package_version("gguf"),
        "version": 3,
        "alignment": w.data_alignment,
        "data_offset": None,
        "metadata": [{"key": k, "value": tagged(v.value, v.type, v.sub_type)} for k, v in w.kv_data[0].items()],
        "tensors": tensors,
    }


# ---------------------------------------------------------------------------
# Reading


def decode(parts, i, vtype):
    """Rebuild one value from GGUFReader's flat list of numpy parts, starting
    at parts[i]; returns (description, index after the value). GGUFReader's
    own ReaderField.contents() flattens nested arrays and loses the element
    type of empty arrays, so the structure is rebuilt from the parts it parsed."""
    vtype = GGUFValueType(vtype)
    name = TYPE_NAMES[vtype]
    if vtype == GGUFValueType.STRING:
        length, data = parts[i], parts[i + 1]
        assert int(length[0]) == len(data), "string length part disagrees with its data"
        return {"type": name, "value": bytes(data).decode("utf-8")}, i + 2
    if vtype == GGUFValueType.ARRAY:
        elem = GGUFValueType(int(parts[i][0]))
        count = int(parts[i + 1][0])
        i += 2
        items = []
        for _ in range(count):
            item, i = decode(parts, i, elem)
            items.append(item)
        return {"type": name, "elem": TYPE_NAMES[elem], "items": items}, i
    (scalar,) = parts[i]
    if vtype in FLOAT_BITS:
        bits = parts[i].view(np.uint32 if vtype == GGUFValueType.FLOAT32 else np.uint64)
        return {"type": name, "bits": int(bits[0])}, i + 1
    if vtype == GGUFValueType.BOOL:
        return {"type": name, "value": bool(scalar)}, i + 1
    return {"type": name, "value": int(scalar)}, i + 1


def plain(description):
    """What ReaderField.contents() returns for a non-nested value."""
    if description["type"] == "array":
        return [plain(v) for v in description["items"]]
    if description["type"] in ("f32", "f64"):
        return None  # compared through the bit pattern instead
    return description["value"]


def read(path):
    reader = GGUFReader(path)
    metadata = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the header, which GGUFReader lists as pseudo-fields
        # parts: [key length, key bytes, value type, value parts...]
        value, end = decode(field.parts, 3, int(field.parts[2][0]))
        if end != len(field.parts):
            raise AssertionError(f"{key}: {len(field.parts) - end} parts left after the value")
        nested = value["type"] == "array" and value["elem"] == "array"
        if not nested and value["type"] not in ("f32", "f64") and not (
            value["type"] == "array" and (value["elem"] in ("f32", "f64") or not value["items"])
        ):
            if field.contents() != plain(value):
                raise AssertionError(f"{key}: contents() {field.contents()!r} != parts {plain(value)!r}")
        metadata.append({"key": key, "value": value})
    tensors = []
    for t in reader.tensors:
        tensors.append({
            "name": t.name,
            "type": t.tensor_type.name,
            "type_id": int(t.tensor_type),
            "dims": [int(d) for d in t.shape],  # the file's order, which is ggml's
            "n_bytes": int(t.n_bytes),
            "offset": int(t.data_offset) - int(reader.data_offset),
            "data": t.data.tobytes().hex(),
        })
    return {
        "gguf_py": package_version("gguf"),
        "version": int(reader.fields["GGUF.version"].parts[0][0]),
        "alignment": int(reader.alignment),
        "data_offset": int(reader.data_offset),
        "metadata": metadata,
        "tensors": tensors,
    }


def main(argv):
    if len(argv) == 4 and argv[1] == "write" and argv[2] in CASES:
        description = write(argv[2], argv[3])
    elif len(argv) == 3 and argv[1] == "read":
        description = read(argv[2])
    else:
        sys.exit(f"usage: {argv[0]} write {{{','.join(CASES)}}} OUT.gguf | read IN.gguf")
    json.dump(description, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv)
