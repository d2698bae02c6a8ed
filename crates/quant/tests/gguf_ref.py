"""Reference (de)quantization with gguf-py, for the quant crate's tests.

usage: gguf_ref.py dequantize TYPE  < blocks  > f32 values (little-endian)
       gguf_ref.py quantize   TYPE  < f32 values > blocks

TYPE is a ggml type name (Q4_K, F16, ...). Raw bytes in, raw bytes out, so
the Rust side needs no serialization format.
"""

import sys

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize


def main() -> None:
    op, type_name = sys.argv[1], sys.argv[2]
    qtype = GGMLQuantizationType[type_name]
    data = np.frombuffer(sys.stdin.buffer.read(), dtype=np.uint8)
    if op == "dequantize":
        out = np.ascontiguousarray(dequantize(data, qtype), dtype=np.float32)
    elif op == "quantize":
        out = np.ascontiguousarray(quantize(data.view(np.float32), qtype))
    else:
        raise SystemExit(f"unknown operation {op!r}")
    sys.stdout.buffer.write(out.tobytes())


if __name__ == "__main__":
    main()
