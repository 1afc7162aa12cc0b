//! Output buffers. Large outputs are written exactly once, so they are allocated without
//! zeroing, and on Linux the kernel is asked to back them with 2 MiB pages: filling a fresh
//! 64 MiB buffer otherwise spends more time in 16k page faults than in copying.

use std::mem::{size_of, MaybeUninit};

use crate::error::{Error, Result};

/// Outputs at least this large get the huge-page advice.
const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// An empty vector with room for `len` elements, or a RangeError naming `arg` when the
/// memory cannot be had. Allocation failure would otherwise abort the whole process (Node
/// included) or trap the wasm instance, so every size that comes from the caller goes through here.
pub(crate) fn try_with_capacity<T>(len: usize, arg: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    let bytes = len.checked_mul(size_of::<T>());
    match bytes {
        Some(b) if b <= isize::MAX as usize && v.try_reserve_exact(len).is_ok() => Ok(v),
        _ => Err(Error::range(
            arg,
            format!("an output of {len} elements ({} bytes) cannot be allocated", bytes.map_or("too many".to_string(), |b| b.to_string())),
        )),
    }
}

/// `vec![value; len]`, failing with a RangeError naming `arg` instead of aborting.
pub(crate) fn try_vec<T: Clone>(value: T, len: usize, arg: &str) -> Result<Vec<T>> {
    let mut v = try_with_capacity(len, arg)?;
    v.resize(len, value);
    Ok(v)
}

/// Zeroed 8-byte words (an aligned byte buffer), failing with a RangeError naming `arg`.
pub fn try_zeroed_words(len: usize, arg: &str) -> Result<Vec<u64>> {
    try_vec(0u64, len, arg)
}

/// [`filled_vec`], failing with a RangeError naming `arg` when the memory cannot be had.
pub(crate) fn try_filled_vec<T: Copy>(len: usize, arg: &str, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Result<Vec<T>> {
    let v = try_with_capacity(len, arg)?;
    Ok(fill_reserved(v, len, fill))
}

/// A vector of `len` elements that `fill` must initialise completely: `fill` receives the
/// uninitialised storage and writes every element. Aborts if the memory cannot be had: use
/// [`try_filled_vec`] for sizes a caller controls.
pub(crate) fn filled_vec<T: Copy>(len: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    fill_reserved(Vec::with_capacity(len), len, fill)
}

fn fill_reserved<T: Copy>(mut v: Vec<T>, len: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    advise_huge_pages(v.as_mut_ptr() as *mut u8, len * size_of::<T>());
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: `fill` initialised all `len` elements (each caller writes every row), and
    // `T: Copy` has no drop glue, so even a partially written vector could not double-free.
    unsafe { v.set_len(len) };
    v
}

/// Asks Linux for 2 MiB pages under a fresh allocation of `bytes` at `ptr` (4 MiB or more; a
/// no-op elsewhere): fewer page faults when it is first written. Also used by the CUDA crate for
/// its download buffers.
#[cfg(target_os = "linux")]
pub fn advise_huge_pages(ptr: *mut u8, bytes: usize) {
    const HUGE: usize = 2 << 20;
    if bytes < HUGE_PAGE_MIN_BYTES {
        return;
    }
    let start = (ptr as usize).div_ceil(HUGE) * HUGE;
    let end = (ptr as usize + bytes) / HUGE * HUGE;
    if end > start {
        // SAFETY: [start, end) lies inside the allocation just made; the advice changes no
        // contents and failure (e.g. THP disabled) is harmless, so the result is ignored.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
pub fn advise_huge_pages(_ptr: *mut u8, _bytes: usize) {
    let _ = HUGE_PAGE_MIN_BYTES;
}

/// Copies `src` into uninitialised storage of the same length.
#[inline(always)]
pub(crate) fn write_slice<T: Copy>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    assert_eq!(dst.len(), src.len());
    // SAFETY: lengths are equal, the regions cannot overlap (one is borrowed mutably), and
    // MaybeUninit<T> has the layout of T.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr() as *mut T, src.len()) };
}
