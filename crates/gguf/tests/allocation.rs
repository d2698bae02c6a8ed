//! How much the reader allocates for a hostile header: a count is only
//! checked against the bytes left in the file, so a file of a few gigabytes
//! can claim hundreds of millions of strings, arrays, keys or tensors. The
//! reader must not reserve memory for all of them before it has parsed any;
//! what it holds should grow with what it actually read.
//!
//! A counting global allocator measures the peak; this file holds a single
//! test so that no other test allocates at the same time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use gguf::GgufFile;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged and only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const FILE_LEN: usize = 8 << 20;

/// Magic, version 3, the counts, then `body`, padded with 0xff (which
/// parses as nothing valid: every length read from it is huge).
fn hostile(n_tensors: u64, n_kv: u64, body: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b.extend(body);
    b.resize(FILE_LEN, 0xff);
    b
}

/// Key `k` holding an array of `elem_type` whose count fills the file.
fn array_header(elem_type: u32, min_elem_bytes: u64) -> Vec<u8> {
    let mut b = 1u64.to_le_bytes().to_vec();
    b.push(b'k');
    b.extend(9u32.to_le_bytes());
    b.extend(elem_type.to_le_bytes());
    b.extend((FILE_LEN as u64 / min_elem_bytes - 64).to_le_bytes());
    b
}

/// Bytes allocated at the peak of parsing `bytes`, beyond the buffer itself.
fn peak_while_parsing(bytes: Vec<u8>) -> usize {
    let before = CURRENT.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = GgufFile::from_bytes(bytes);
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert!(result.is_err(), "the hostile file parsed");
    peak
}

#[test]
fn hostile_counts_do_not_reserve_memory_up_front() {
    let max_count = FILE_LEN as u64 / 8;
    let cases = [
        ("array of strings", hostile(0, 1, &array_header(8, 8))),
        ("array of arrays", hostile(0, 1, &array_header(9, 12))),
        ("metadata count", hostile(0, max_count / 13 - 64, &[])),
        ("tensor count", hostile(max_count / 32 - 64, 0, &[])),
    ];
    for (what, bytes) in cases {
        let peak = peak_while_parsing(bytes);
        // Reserving the whole count would take two to three times the file
        // size; what the reader reserves ahead (its MAX_RESERVE elements of
        // each list) is well under a megabyte.
        assert!(
            peak < 1 << 20,
            "{what}: parsing allocated {peak} bytes for an {FILE_LEN}-byte file"
        );
    }
}
