//! What a CUBIN says about its kernels, read from the ELF file itself: the
//! entry functions, their registers and their stack frames.
//!
//! ptxas's `-v` report says the same and more (spills), but NVRTC does not
//! always hand it over: NVRTC 13.0 on the H200 machine left the log empty for
//! sm_90a while the same version's wheel filled it elsewhere. The ELF is
//! always there. Layout (as cuobjdump reads it): each kernel has a section
//! `.nv.info.<kernel>`; the common `.nv.info` section holds attribute
//! records `[format u8][attribute u8][size u16][payload]`, among them
//! EIATTR_REGCOUNT and EIATTR_FRAME_SIZE with payload `[symbol u32][value u32]`,
//! the symbol an index into `.symtab`.

/// Attribute record formats: a payload of `size` bytes follows only for this one.
const EIFMT_SVAL: u8 = 0x04;
const EIATTR_REGCOUNT: u8 = 0x2f;
const EIATTR_FRAME_SIZE: u8 = 0x11;
const SHT_SYMTAB: u32 = 2;
const ELF64_SYM_SIZE: usize = 24;

/// One kernel as the CUBIN describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CubinKernel {
    pub name: String,
    pub registers: u32,
    /// Per-thread local memory frame (spilled registers and local arrays).
    pub frame_bytes: u32,
}

struct Section<'a> {
    name: &'a str,
    kind: u32,
    link: u32,
    data: &'a [u8],
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?)).ok()
}

fn c_str_at(bytes: &[u8], at: usize) -> Option<&str> {
    let tail = bytes.get(at..)?;
    let end = tail.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&tail[..end]).ok()
}

fn sections(elf: &[u8]) -> Option<Vec<Section<'_>>> {
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return None; // not a little-endian 64-bit ELF
    }
    let table = u64_at(elf, 0x28)?;
    let entry_size = usize::from(u16_at(elf, 0x3a)?);
    let count = usize::from(u16_at(elf, 0x3c)?);
    let names_index = usize::from(u16_at(elf, 0x3e)?);
    let header = |i: usize| elf.get(table + i * entry_size..table + (i + 1) * entry_size);
    let names = header(names_index)?;
    let names = elf.get(u64_at(names, 0x18)?..)?;
    (0..count)
        .map(|i| {
            let h = header(i)?;
            let offset = u64_at(h, 0x18)?;
            let size = u64_at(h, 0x20)?;
            Some(Section {
                name: c_str_at(names, u32_at(h, 0)? as usize)?,
                kind: u32_at(h, 4)?,
                link: u32_at(h, 0x28)?,
                data: elf.get(offset..offset.checked_add(size)?)?,
            })
        })
        .collect()
}

/// The kernels of `cubin`, sorted by name; `None` if it is not a CUBIN this
/// reader understands.
pub fn cubin_kernels(cubin: &[u8]) -> Option<Vec<CubinKernel>> {
    let sections = sections(cubin)?;
    let symtab = sections.iter().find(|s| s.kind == SHT_SYMTAB)?;
    let strtab = sections.get(symtab.link as usize)?;
    let symbol_name = |index: u32| {
        let at = index as usize * ELF64_SYM_SIZE;
        c_str_at(strtab.data, u32_at(symtab.data, at)? as usize)
    };

    let mut kernels: Vec<CubinKernel> = sections
        .iter()
        .filter_map(|s| s.name.strip_prefix(".nv.info."))
        .map(|name| CubinKernel {
            name: name.to_string(),
            ..Default::default()
        })
        .collect();
    kernels.sort_by(|a, b| a.name.cmp(&b.name));

    let info = sections.iter().find(|s| s.name == ".nv.info")?;
    let mut at = 0;
    while at + 4 <= info.data.len() {
        let (format, attribute) = (info.data[at], info.data[at + 1]);
        let value = u16_at(info.data, at + 2)?;
        if format != EIFMT_SVAL {
            at += 4;
            continue;
        }
        let payload = info.data.get(at + 4..at + 4 + usize::from(value))?;
        at += 4 + usize::from(value);
        if payload.len() != 8 || (attribute != EIATTR_REGCOUNT && attribute != EIATTR_FRAME_SIZE) {
            continue;
        }
        let name = symbol_name(u32_at(payload, 0)?)?;
        let amount = u32_at(payload, 4)?;
        if let Ok(i) = kernels.binary_search_by(|k| k.name.as_str().cmp(name)) {
            match attribute {
                EIATTR_REGCOUNT => kernels[i].registers = amount,
                _ => kernels[i].frame_bytes = amount,
            }
        }
    }
    Some(kernels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_is_not_an_elf() {
        assert_eq!(cubin_kernels(b""), None);
        assert_eq!(cubin_kernels(b"\x7fELF\x02\x01 and then nothing"), None);
    }
}
