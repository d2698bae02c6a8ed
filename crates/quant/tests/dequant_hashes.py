"""Per-tensor hashes of gguf-py's dequantization of a whole GGUF file, for
the quant crate's real-model test (tests/real_models.rs).

usage: dequant_hashes.py MODEL.gguf  > one line per tensor

Each line is `NAME TYPE N_VALUES SHA256`, where SHA256 is the hex digest of
`gguf.quants.dequantize` of the tensor's bytes as little-endian f32. The
Rust side computes the same digest from `quant::dequantize`, so only 64
characters per tensor cross the pipe instead of the model's f32 values.
"""

import hashlib
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def main() -> None:
    reader = GGUFReader(sys.argv[1])
    out = sys.stdout
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        values = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
        digest = hashlib.sha256(values.tobytes()).hexdigest()
        out.write(f"{tensor.name} {tensor.tensor_type.name} {values.size} {digest}\n")


if __name__ == "__main__":
    main()
