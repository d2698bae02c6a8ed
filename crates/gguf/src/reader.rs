//! Parsing a GGUF file from a memory map (or an owned buffer) with every
//! count, size and offset checked against the bytes actually present.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{GgufError, Result};
use crate::value::{Array, Metadata, Value, ValueType};
use crate::GgmlType;

/// `"GGUF"` read as a little-endian u32.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of each tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Arrays of arrays nest no deeper than this; real files use at most one
/// level, and an unbounded depth would let a small file exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 4;
/// Smallest encoding of one tensor-index entry (empty name, one dimension).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
/// Smallest encoding of one key/value pair (empty key, a one-byte value).
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Most elements reserved ahead of parsing them. A count is only checked
/// against the bytes left in the file, and an entry of the index, a string or
/// an array takes more memory than its smallest encoding (24 bytes for an
/// empty 8-byte string), so reserving the full count would let a hostile
/// header in a multi-gigabyte file ask for several times the file size
/// before a single element is read; past this, vectors grow as elements parse.
const MAX_RESERVE: usize = 4096;

/// One entry of the tensor index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: GgmlType,
    /// Dimensions in ggml order: `dims[0]` is the contiguous row length.
    pub dims: Vec<u64>,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    /// Bytes the tensor occupies (checked to lie inside the file).
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        // Cannot overflow: checked when the index was parsed.
        self.dims.iter().product()
    }

    /// Elements per row (`dims[0]`).
    pub fn row_len(&self) -> u64 {
        self.dims[0]
    }

    /// Number of rows (product of the remaining dimensions).
    pub fn n_rows(&self) -> u64 {
        self.dims[1..].iter().product()
    }

    /// Shape as `896×4864` in ggml order.
    pub fn shape_string(&self) -> String {
        let dims: Vec<String> = self.dims.iter().map(u64::to_string).collect();
        dims.join("×")
    }
}

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file; tensor data is borrowed from the mapping on demand.
pub struct GgufFile {
    bytes: Bytes,
    path: Option<PathBuf>,
    version: u32,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Map and parse the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io_err = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        let bytes = if len == 0 {
            // Mapping an empty file fails on some platforms; parse reports truncation.
            Bytes::Owned(Vec::new())
        } else {
            // SAFETY: the mapping is read-only. Like every mmap-based reader we
            // rely on the file not being truncated or rewritten while mapped.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)?;
            Bytes::Mapped(map)
        };
        let mut parsed = Self::parse(bytes)?;
        parsed.path = Some(path.to_path_buf());
        Ok(parsed)
    }

    /// Parse a file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Bytes::Owned(bytes))
    }

    fn parse(bytes: Bytes) -> Result<Self> {
        let header = parse_header(bytes.as_slice())?;
        let mut by_name = HashMap::with_capacity(header.tensors.len());
        for (i, t) in header.tensors.iter().enumerate() {
            by_name.insert(t.name.clone(), i);
        }
        Ok(GgufFile {
            bytes,
            path: None,
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            by_name,
            alignment: header.alignment,
            data_offset: header.data_offset,
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's bytes, or an error naming the tensor when it is absent.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.tensor(name).ok_or_else(|| GgufError::Tensor {
            name: name.to_string(),
            reason: "not present in the file".to_string(),
        })?;
        Ok(self.tensor_data(info))
    }

    /// The bytes of a tensor of this file's index.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        // Bounds were checked against the file length when the index was parsed.
        let start = (self.data_offset + info.offset) as usize;
        &self.bytes.as_slice()[start..start + info.n_bytes as usize]
    }

    /// The whole file; tensor `t` lies at `data_offset() + t.offset`.
    pub fn raw_bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn file_len(&self) -> u64 {
        self.bytes.as_slice().len() as u64
    }

    /// Total bytes of all tensors.
    pub fn tensor_bytes_total(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_bytes).sum()
    }
}

struct Header {
    version: u32,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// A bounds-checked little-endian cursor.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, field: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                field: field(),
                offset: self.pos as u64,
                needed: n,
                file_len: self.buf.len() as u64,
            });
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }

    fn array<const N: usize>(&mut self, field: &dyn Fn() -> String) -> Result<[u8; N]> {
        let bytes = self.take(N as u64, field)?;
        Ok(bytes.try_into().expect("take returned N bytes"))
    }

    fn u8(&mut self, field: &dyn Fn() -> String) -> Result<u8> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &dyn Fn() -> String) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn invalid(&self, offset: usize, field: String, reason: String) -> GgufError {
        GgufError::Invalid {
            field,
            offset: offset as u64,
            reason,
        }
    }

    /// A count whose elements take at least `min_size` bytes each: rejected
    /// when the rest of the file could not hold that many, so that a hostile
    /// count never turns into a huge allocation.
    fn count(&mut self, min_size: u64, field: &dyn Fn() -> String) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(field)?;
        let fits = n
            .checked_mul(min_size)
            .is_some_and(|bytes| bytes <= self.remaining());
        if !fits {
            return Err(self.invalid(
                at,
                field(),
                format!(
                    "count {n} cannot fit in the {} bytes left in the file",
                    self.remaining()
                ),
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, field: &dyn Fn() -> String) -> Result<String> {
        let at = self.pos;
        let len = self.u64(field)?;
        let bytes = self.take(len, field)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.invalid(at, field(), format!("string is not valid UTF-8 ({e})")))
    }

    fn value_type(&mut self, field: &dyn Fn() -> String) -> Result<ValueType> {
        let at = self.pos;
        let id = self.u32(field)?;
        ValueType::from_id(id)
            .ok_or_else(|| self.invalid(at, field(), format!("unknown value type {id}")))
    }

    fn value(&mut self, ty: ValueType, depth: usize, field: &dyn Fn() -> String) -> Result<Value> {
        let at = self.pos;
        Ok(match ty {
            ValueType::U8 => Value::U8(self.u8(field)?),
            ValueType::I8 => Value::I8(self.u8(field)? as i8),
            ValueType::U16 => Value::U16(self.u16(field)?),
            ValueType::I16 => Value::I16(self.u16(field)? as i16),
            ValueType::U32 => Value::U32(self.u32(field)?),
            ValueType::I32 => Value::I32(self.u32(field)? as i32),
            ValueType::F32 => Value::F32(f32::from_bits(self.u32(field)?)),
            ValueType::U64 => Value::U64(self.u64(field)?),
            ValueType::I64 => Value::I64(self.u64(field)? as i64),
            ValueType::F64 => Value::F64(f64::from_bits(self.u64(field)?)),
            ValueType::Bool => match self.u8(field)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(self.invalid(at, field(), format!("bool byte is {b}, not 0 or 1")))
                }
            },
            ValueType::String => Value::String(self.string(field)?),
            ValueType::Array => Value::Array(self.array_value(depth, field)?),
        })
    }

    fn array_value(&mut self, depth: usize, field: &dyn Fn() -> String) -> Result<Array> {
        let at = self.pos;
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.invalid(
                at,
                field(),
                format!("arrays nested deeper than {MAX_ARRAY_DEPTH} levels"),
            ));
        }
        let elem = self.value_type(field)?;
        let n = self.count(elem.min_encoded_size(), field)?;
        macro_rules! scalars {
            ($variant:ident, $read:ident, $conv:expr) => {{
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push($conv(self.$read(field)?));
                }
                Array::$variant(v)
            }};
        }
        Ok(match elem {
            ValueType::U8 => Array::U8(self.take(n as u64, field)?.to_vec()),
            ValueType::I8 => Array::I8(
                self.take(n as u64, field)?
                    .iter()
                    .map(|&b| b as i8)
                    .collect(),
            ),
            ValueType::U16 => scalars!(U16, u16, |x| x),
            ValueType::I16 => scalars!(I16, u16, |x: u16| x as i16),
            ValueType::U32 => scalars!(U32, u32, |x| x),
            ValueType::I32 => scalars!(I32, u32, |x: u32| x as i32),
            ValueType::F32 => scalars!(F32, u32, f32::from_bits),
            ValueType::U64 => scalars!(U64, u64, |x| x),
            ValueType::I64 => scalars!(I64, u64, |x: u64| x as i64),
            ValueType::F64 => scalars!(F64, u64, f64::from_bits),
            ValueType::Bool => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let b_at = self.pos;
                    match self.u8(field)? {
                        0 => v.push(false),
                        1 => v.push(true),
                        b => {
                            return Err(self.invalid(
                                b_at,
                                field(),
                                format!("bool byte is {b}, not 0 or 1"),
                            ))
                        }
                    }
                }
                Array::Bool(v)
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n.min(MAX_RESERVE));
                for _ in 0..n {
                    v.push(self.string(field)?);
                }
                Array::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n.min(MAX_RESERVE));
                for _ in 0..n {
                    v.push(self.array_value(depth + 1, field)?);
                }
                Array::Array(v)
            }
        })
    }
}

fn parse_header(buf: &[u8]) -> Result<Header> {
    let mut c = Cursor { buf, pos: 0 };
    let magic: [u8; 4] = c.array(&|| "magic".to_string())?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32(&|| "version".to_string())?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(GgufError::UnsupportedVersion {
                version,
                hint: "; version 1 used 32-bit counts, convert the file with a current llama.cpp",
            })
        }
        v if v.swap_bytes() <= 3 => {
            return Err(GgufError::UnsupportedVersion {
                version,
                hint: "; the file looks big-endian, which is not supported",
            })
        }
        _ => return Err(GgufError::UnsupportedVersion { version, hint: "" }),
    }
    let n_tensors = c.count(MIN_TENSOR_INFO_BYTES, &|| "tensor count".to_string())?;
    let n_kv = c.count(MIN_KV_BYTES, &|| "metadata count".to_string())?;

    let mut metadata = Metadata::new();
    let mut keys = HashSet::with_capacity(n_kv.min(MAX_RESERVE));
    // Where `general.alignment`'s value is, for an error about it.
    let mut alignment_at = 0;
    for i in 0..n_kv {
        let key_at = c.pos;
        let key = c.string(&|| format!("metadata key #{i}"))?;
        if !keys.insert(key.clone()) {
            return Err(c.invalid(
                key_at,
                format!("metadata key {key}"),
                "duplicate key".to_string(),
            ));
        }
        let field = || format!("metadata value {key}");
        let ty = c.value_type(&field)?;
        if key == "general.alignment" {
            alignment_at = c.pos as u64;
        }
        let value = c.value(ty, 0, &field)?;
        metadata.push_new(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            // Past 2^30 the data section's start could overflow; no writer uses more than 64.
            Some(a) if a.is_power_of_two() && a <= 1 << 30 => a,
            _ => {
                let found = match v.as_u64() {
                    Some(a) => a.to_string(),
                    None => format!("a {}", v.type_description()),
                };
                return Err(GgufError::Invalid {
                    field: "metadata value general.alignment".to_string(),
                    offset: alignment_at,
                    reason: format!("is {found}; it must be a power of two up to 2^30"),
                });
            }
        },
    };

    let mut tensors = Vec::with_capacity(n_tensors.min(MAX_RESERVE));
    let mut seen = HashSet::with_capacity(n_tensors.min(MAX_RESERVE));
    let mut offsets_at = Vec::with_capacity(n_tensors.min(MAX_RESERVE));
    for i in 0..n_tensors {
        let name_at = c.pos;
        let name = c.string(&|| format!("tensor #{i} name"))?;
        if !seen.insert(name.clone()) {
            return Err(c.invalid(
                name_at,
                format!("tensor {name}"),
                "duplicate tensor name".to_string(),
            ));
        }
        let field = || format!("tensor {name}");
        let dims_at = c.pos;
        let n_dims = c.u32(&field)? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(c.invalid(
                dims_at,
                field(),
                format!("{n_dims} dimensions (must be 1..={MAX_DIMS})"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(c.u64(&field)?);
        }
        let type_at = c.pos;
        let type_id = c.u32(&field)?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| {
            c.invalid(type_at, field(), format!("unknown ggml type id {type_id}"))
        })?;
        let offset_at = c.pos;
        let offset = c.u64(&field)?;

        let n_elements = dims
            .iter()
            .try_fold(
                1u64,
                |acc, &d| if d == 0 { None } else { acc.checked_mul(d) },
            )
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| {
                c.invalid(
                    dims_at,
                    field(),
                    format!("dimensions {dims:?} are zero or overflow"),
                )
            })?;
        if !dims[0].is_multiple_of(ty.block_size() as u64) {
            return Err(c.invalid(
                dims_at,
                field(),
                format!(
                    "row length {} is not a multiple of the {ty} block size {}",
                    dims[0],
                    ty.block_size()
                ),
            ));
        }
        let n_bytes = ty
            .row_bytes(n_elements)
            .ok_or_else(|| c.invalid(dims_at, field(), "byte size overflows".to_string()))?;
        if offset % alignment != 0 {
            return Err(c.invalid(
                offset_at,
                field(),
                format!("data offset {offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        offsets_at.push(offset_at);
        tensors.push(TensorInfo {
            name,
            ty,
            dims,
            offset,
            n_bytes,
        });
    }

    let data_offset = (c.pos as u64)
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| {
            c.invalid(
                c.pos,
                "data section".to_string(),
                format!("alignment {alignment} overflows"),
            )
        })?;
    let file_len = buf.len() as u64;
    for (t, &at) in tensors.iter().zip(&offsets_at) {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(GgufError::Invalid {
                    field: format!("tensor {}", t.name),
                    offset: at as u64,
                    reason: format!(
                        "data [{}, +{}) of the data section at {data_offset} runs past the end of the file ({file_len} bytes)",
                        t.offset, t.n_bytes
                    ),
                })
            }
        }
    }

    check_overlaps(&tensors, &offsets_at)?;

    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// Two tensors must not share bytes: a file whose tensors overlap was not
/// written by any converter, and loading it would run one tensor's bytes as
/// another's weights.
fn check_overlaps(tensors: &[TensorInfo], offsets_at: &[usize]) -> Result<()> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_unstable_by_key(|&i| tensors[i].offset);
    for pair in order.windows(2) {
        let (a, b) = (&tensors[pair[0]], &tensors[pair[1]]);
        // Both ends were checked to lie inside the file, so this cannot overflow.
        let a_end = a.offset + a.n_bytes;
        if a_end > b.offset {
            return Err(GgufError::Invalid {
                field: format!("tensor {}", b.name),
                offset: offsets_at[pair[1]] as u64,
                reason: format!(
                    "data [{}, {}) overlaps tensor {}'s data [{}, {a_end})",
                    b.offset,
                    b.offset + b.n_bytes,
                    crate::shown(&a.name),
                    a.offset
                ),
            });
        }
    }
    Ok(())
}
