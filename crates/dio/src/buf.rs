//! Memory for direct I/O: aligned buffers, the raw memory references that travel
//! inside device requests, and the scope that keeps borrowed memory alive until the
//! device is done with it.
//!
//! This module and `device` are the only places with `unsafe`. Everything above them
//! (the engine, the block maps, the CLI) handles memory through the safe types here.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;

/// A heap buffer whose address is aligned to a chosen power of two, as direct I/O
/// needs (the device's memory alignment, see [`crate::Geometry::mem_align`]).
///
/// The contents start zeroed.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    align: usize,
    backing: Backing,
}

/// Where an [`AlignedBuf`]'s memory comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backing {
    Heap,
    /// A private mapping of this many bytes at the buffer's address (huge pages).
    Mapped(usize),
    /// One half of a huge page shared with another buffer (see [`take_half`]).
    Half,
}

/// Buffers of at least this many bytes live in huge pages (`MADV_HUGEPAGE`): a
/// 1 MiB buffer takes half of a 2 MiB page shared with another, larger ones get a
/// mapping of their own sized in huge pages. A 1 MiB buffer in small pages is 256
/// scattered pages: more than many devices take in one request (virtio-blk: 254
/// segments), so the kernel splits every such I/O in two. In a huge page it is one
/// segment, and a 4 MiB buffer is one request.
pub const HUGE_MIN: usize = 1 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// Buffers of up to this size (and at least [`HUGE_MIN`]) take half a huge page.
const HALF: usize = HUGE_PAGE / 2;

/// A huge page split between two buffers: 1 MiB buffers, the most common large
/// size, then cost 1 MiB each, not a whole huge page.
struct HalfPage {
    base: usize,
    used: [bool; 2],
    /// The half held data before (a fresh mapping is zero; a reused half is not).
    dirty: [bool; 2],
}

static HALVES: std::sync::Mutex<Vec<HalfPage>> = std::sync::Mutex::new(Vec::new());

fn halves() -> std::sync::MutexGuard<'static, Vec<HalfPage>> {
    HALVES.lock().unwrap_or_else(|e| e.into_inner())
}

/// A zeroed, [`HALF`]-aligned half of a huge page; `None` if mapping fails.
fn take_half() -> Option<NonNull<u8>> {
    let mut pages = halves();
    let free = pages.iter_mut().find_map(|p| {
        let i = p.used.iter().position(|u| !u)?;
        Some((p, i))
    });
    let (addr, dirty) = match free {
        Some((p, i)) => {
            p.used[i] = true;
            (p.base + i * HALF, std::mem::replace(&mut p.dirty[i], true))
        }
        None => {
            let (ptr, _) = map_huge(HUGE_PAGE)?;
            let base = ptr.as_ptr() as usize;
            pages.push(HalfPage {
                base,
                used: [true, false],
                dirty: [true, false],
            });
            (base, false)
        }
    };
    drop(pages);
    let ptr = NonNull::new(addr as *mut u8)?;
    if dirty {
        // SAFETY: the half was marked used above, so it is ours alone, and it lies in
        // a live mapping of HUGE_PAGE bytes.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, HALF) };
    }
    Some(ptr)
}

/// Give back a half from [`take_half`]; the page is unmapped when both are free.
fn give_half(ptr: NonNull<u8>) {
    let addr = ptr.as_ptr() as usize;
    let base = addr & !(HUGE_PAGE - 1);
    let mut pages = halves();
    let Some(at) = pages.iter().position(|p| p.base == base) else {
        return;
    };
    pages[at].used[(addr - base) / HALF] = false;
    if pages[at].used == [false, false] {
        pages.swap_remove(at);
        drop(pages);
        // SAFETY: both halves were given back, so nothing uses the page, and it was
        // mapped by `map_huge` with exactly this base and size.
        unsafe { libc::munmap(base as *mut libc::c_void, HUGE_PAGE) };
    }
}

/// A zeroed private anonymous mapping of `len` bytes rounded up to huge pages, at a
/// huge-page-aligned address, advised to use huge pages. `None` if mapping fails
/// (the caller falls back to the heap).
fn map_huge(len: usize) -> Option<(NonNull<u8>, usize)> {
    let size = len.checked_next_multiple_of(HUGE_PAGE)?;
    let reserve = size.checked_add(HUGE_PAGE)?;
    // SAFETY: a fresh anonymous private mapping; no existing memory is touched.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let base = raw as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    let (head, tail) = (start - base, base + reserve - (start + size));
    // SAFETY: both ranges lie inside the mapping made above and are not in use; what
    // remains is exactly [start, start + size).
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail);
        }
        // Advice only: without transparent huge pages the buffer still works.
        libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
    }
    NonNull::new(start as *mut u8).map(|p| (p, size))
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes at an address aligned to `align` (a power of
    /// two; values below 1 are taken as 1).
    ///
    /// # Panics
    /// If `align` is not a power of two or the size overflows `isize`, as `Vec` does.
    pub fn new(len: usize, align: usize) -> Self {
        let align = align.max(1);
        assert!(
            align.is_power_of_two(),
            "alignment {align} is not a power of two"
        );
        if len == 0 {
            // A dangling but aligned pointer, as Vec does for empty allocations.
            let ptr = NonNull::new(align as *mut u8).expect("align is non-zero");
            return AlignedBuf {
                ptr,
                len,
                align,
                backing: Backing::Heap,
            };
        }
        if (HUGE_MIN..=HALF).contains(&len) && align <= HALF {
            if let Some(ptr) = take_half() {
                return AlignedBuf {
                    ptr,
                    len,
                    align,
                    backing: Backing::Half,
                };
            }
        }
        if len >= HUGE_MIN && align <= HUGE_PAGE {
            if let Some((ptr, mapped)) = map_huge(len) {
                return AlignedBuf {
                    ptr,
                    len,
                    align,
                    backing: Backing::Mapped(mapped),
                };
            }
        }
        let layout = Layout::from_size_align(len, align).expect("buffer size overflows");
        // SAFETY: layout has a non-zero size (len > 0 checked above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len,
            align,
            backing: Backing::Heap,
        }
    }

    /// A buffer holding a copy of `data`, aligned to `align`.
    pub fn from_slice(data: &[u8], align: usize) -> Self {
        let mut buf = AlignedBuf::new(data.len(), align);
        buf.copy_from_slice(data);
        buf
    }

    /// The alignment this buffer was allocated with.
    pub fn align(&self) -> usize {
        self.align
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (or dangling with len 0) and we own it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        match self.backing {
            Backing::Mapped(size) => {
                // SAFETY: [ptr, ptr + size) is the mapping made by `map_huge`, owned
                // by this buffer alone.
                unsafe { libc::munmap(self.ptr.as_ptr().cast(), size) };
                return;
            }
            Backing::Half => return give_half(self.ptr),
            Backing::Heap => {}
        }
        let layout = Layout::from_size_align(self.len, self.align).expect("layout was valid");
        // SAFETY: allocated in `new` with this very layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.align)
            .finish()
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        AlignedBuf::from_slice(self, self.align)
    }
}

/// Equal slots cut from one aligned allocation, lent out as owned buffers
/// ([`ArenaBuf`]) and taken back when they drop: memory a device registers once
/// (io_uring fixed buffers, [`crate::device::uring::UringDevice::register_arena`])
/// and then uses for every request without pinning pages again.
pub struct BufArena {
    /// Owns the memory; only reached through `base` after construction.
    _mem: AlignedBuf,
    base: NonNull<u8>,
    slots: usize,
    slot_len: usize,
    free: std::sync::Mutex<Vec<usize>>,
}

// SAFETY: the arena owns its memory; each slot is reachable only through the one
// ArenaBuf that holds it (the free list hands a slot out once), and the free list
// is behind a mutex.
unsafe impl Send for BufArena {}
// SAFETY: as for Send: shared access never touches slot memory without owning it.
unsafe impl Sync for BufArena {}

impl BufArena {
    /// `slots` zeroed buffers of `slot_len` bytes each, every one aligned to
    /// `align` (`slot_len` is rounded up to a multiple of it).
    ///
    /// # Panics
    /// If `align` is not a power of two or the total size overflows.
    pub fn new(slots: usize, slot_len: usize, align: usize) -> std::sync::Arc<BufArena> {
        let align = align.max(1);
        assert!(
            align.is_power_of_two(),
            "alignment {align} is not a power of two"
        );
        let slot_len = slot_len.max(1).next_multiple_of(align);
        let total = slots.checked_mul(slot_len).expect("arena size overflows");
        let mut mem = AlignedBuf::new(total, align);
        let base = NonNull::new(mem.as_mut_ptr()).unwrap_or(NonNull::dangling());
        std::sync::Arc::new(BufArena {
            _mem: mem,
            base,
            slots,
            slot_len,
            free: std::sync::Mutex::new((0..slots).rev().collect()),
        })
    }

    /// A free slot, or `None` if all are lent out.
    pub fn take(self: &std::sync::Arc<Self>) -> Option<ArenaBuf> {
        let index = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(ArenaBuf {
            arena: std::sync::Arc::clone(self),
            index,
        })
    }

    /// Bytes per slot.
    pub fn slot_len(&self) -> usize {
        self.slot_len
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The whole arena, for registering it with a device (registration lends the
    /// kernel nothing to access by itself; only requests over slots do).
    #[cfg_attr(not(feature = "io-uring"), allow(dead_code))]
    pub(crate) fn memory(&self) -> MemRef {
        MemRef {
            ptr: self.base.as_ptr(),
            len: self.slots * self.slot_len,
        }
    }
}

impl fmt::Debug for BufArena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufArena")
            .field("slots", &self.slots)
            .field("slot_len", &self.slot_len)
            .finish()
    }
}

/// One slot of a [`BufArena`], owned until it drops (then the slot is free again).
pub struct ArenaBuf {
    arena: std::sync::Arc<BufArena>,
    index: usize,
}

impl ArenaBuf {
    fn ptr(&self) -> *mut u8 {
        // SAFETY: index < slots, so the offset stays inside the arena's allocation.
        unsafe {
            self.arena
                .base
                .as_ptr()
                .add(self.index * self.arena.slot_len)
        }
    }
}

impl std::ops::Deref for ArenaBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the slot is slot_len bytes of live arena memory (the Arc keeps the
        // arena alive) that only this ArenaBuf may reach.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.arena.slot_len) }
    }
}

impl std::ops::DerefMut for ArenaBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.arena.slot_len) }
    }
}

impl Drop for ArenaBuf {
    fn drop(&mut self) {
        let mut free = self.arena.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(self.index);
    }
}

impl fmt::Debug for ArenaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArenaBuf")
            .field("index", &self.index)
            .field("len", &self.arena.slot_len)
            .finish()
    }
}

// SAFETY: the slot's memory belongs to the arena, which the Arc keeps alive and in
// place however the ArenaBuf moves; no other ArenaBuf holds the same slot.
unsafe impl OwnedBuf for ArenaBuf {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr()
    }
    fn len(&self) -> usize {
        self.arena.slot_len
    }
}

/// An owned buffer that can be handed to an asynchronous request and returned at
/// completion.
///
/// # Safety
/// The memory returned by `as_mut_ptr` must stay valid, at the same address, for
/// `len` bytes while the value lives, even when the value itself is moved (a heap
/// allocation, not an inline array), and must not be accessed through any other
/// path while the engine holds the value.
pub unsafe trait OwnedBuf: Send + 'static {
    /// Start of the buffer's memory.
    fn as_mut_ptr(&mut self) -> *mut u8;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether the buffer is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The buffer's bytes.
    fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len();
        let ptr = self.as_mut_ptr();
        // SAFETY: the trait's contract: `ptr` is valid for `len` bytes while self
        // lives, and &mut self makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }
}

// SAFETY: the allocation is on the heap and owned by the AlignedBuf.
unsafe impl OwnedBuf for AlignedBuf {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

// SAFETY: a Vec's elements live on the heap and do not move when the Vec moves.
unsafe impl OwnedBuf for Vec<u8> {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_slice().as_mut_ptr()
    }
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

// SAFETY: a boxed slice lives on the heap and does not move when the Box moves.
unsafe impl OwnedBuf for Box<[u8]> {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        (**self).as_mut_ptr()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}

/// A window `[start, start + len)` of an owned buffer, itself an owned buffer: for
/// placing data at an offset within an aligned allocation (byte-granular I/O goes
/// zero-copy when the memory of the aligned middle is aligned, i.e. when the
/// buffer's address matches the file offset modulo the logical block).
#[derive(Debug)]
pub struct Window<B> {
    buf: B,
    start: usize,
    len: usize,
}

impl<B: OwnedBuf> Window<B> {
    /// The window of `buf` from `start`, `len` bytes long; `None` if it does not
    /// fit.
    pub fn new(buf: B, start: usize, len: usize) -> Option<Window<B>> {
        let end = start.checked_add(len)?;
        (end <= buf.len()).then_some(Window { buf, start, len })
    }
    /// The whole buffer back.
    pub fn into_inner(self) -> B {
        self.buf
    }
}

// SAFETY: the window lies inside the inner buffer (checked in `new`), whose memory
// is stable across moves per its own OwnedBuf contract.
unsafe impl<B: OwnedBuf> OwnedBuf for Window<B> {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.buf.as_mut_ptr().wrapping_add(self.start)
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// A reference to memory that a device request reads from (writes) or fills
/// (reads): the user-space counterpart of a pinned page range in a bio.
///
/// It carries no lifetime and proves nothing by itself: a [`crate::Request`] is what
/// guarantees that its segments are valid while it lives. Safe code cannot make one
/// ([`MemRef::from_raw`] is `unsafe`), cannot lengthen one, and cannot do anything
/// with one but look at its address and length; device back ends hand them to the
/// kernel in `unsafe` code while they hold the request, and safe devices move data
/// with [`crate::Request::copy_out`] and [`crate::Request::copy_in`].
///
/// Its layout is that of a C `struct iovec` (`repr(C)`, base then length), so a
/// request's segments can go to readv/writev or io_uring as they are.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct MemRef {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a MemRef is an address range; the code that creates it guarantees that the
// memory stays valid and unaliased by Rust references until the request completes,
// whichever thread completes it.
unsafe impl Send for MemRef {}
// SAFETY: as for Send; a MemRef itself is an immutable pair of integers.
unsafe impl Sync for MemRef {}

impl fmt::Debug for MemRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemRef({:p}+{})", self.ptr, self.len)
    }
}

/// The memory of one device request, its segments in order: a slice of
/// [`MemRef`]s. A single segment, by far the most common case, is held inline, so
/// building a request allocates nothing; more spill to the heap.
#[derive(Clone, Default)]
pub struct Segments(SegRepr);

#[derive(Clone, Default)]
enum SegRepr {
    #[default]
    Empty,
    One([MemRef; 1]),
    Many(Vec<MemRef>),
}

impl Segments {
    /// No segments.
    pub fn new() -> Segments {
        Segments(SegRepr::Empty)
    }

    /// Append a segment.
    #[inline]
    pub fn push(&mut self, seg: MemRef) {
        self.0 = match std::mem::take(&mut self.0) {
            SegRepr::Empty => SegRepr::One([seg]),
            SegRepr::One([first]) => {
                let mut v = Vec::with_capacity(4);
                v.extend([first, seg]);
                SegRepr::Many(v)
            }
            SegRepr::Many(mut v) => {
                v.push(seg);
                SegRepr::Many(v)
            }
        };
    }
}

impl std::ops::Deref for Segments {
    type Target = [MemRef];
    fn deref(&self) -> &[MemRef] {
        match &self.0 {
            SegRepr::Empty => &[],
            SegRepr::One(one) => one,
            SegRepr::Many(v) => v,
        }
    }
}

impl std::ops::DerefMut for Segments {
    fn deref_mut(&mut self) -> &mut [MemRef] {
        match &mut self.0 {
            SegRepr::Empty => &mut [],
            SegRepr::One(one) => one,
            SegRepr::Many(v) => v,
        }
    }
}

impl From<Vec<MemRef>> for Segments {
    fn from(v: Vec<MemRef>) -> Segments {
        match v.len() {
            0 => Segments(SegRepr::Empty),
            1 => Segments(SegRepr::One([v[0]])),
            _ => Segments(SegRepr::Many(v)),
        }
    }
}

impl From<MemRef> for Segments {
    fn from(seg: MemRef) -> Segments {
        Segments(SegRepr::One([seg]))
    }
}

impl FromIterator<MemRef> for Segments {
    fn from_iter<I: IntoIterator<Item = MemRef>>(iter: I) -> Segments {
        let mut s = Segments::new();
        for seg in iter {
            s.push(seg);
        }
        s
    }
}

impl<'a> IntoIterator for &'a Segments {
    type Item = &'a MemRef;
    type IntoIter = std::slice::Iter<'a, MemRef>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl fmt::Debug for Segments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

const _: () = assert!(
    std::mem::size_of::<MemRef>() == std::mem::size_of::<libc::iovec>()
        && std::mem::align_of::<MemRef>() == std::mem::align_of::<libc::iovec>()
);

/// The segments as the `struct iovec` array that readv/writev take, without a copy.
pub(crate) fn as_iovecs(segs: &[MemRef]) -> &[libc::iovec] {
    // SAFETY: MemRef is repr(C) with the fields of iovec in iovec's order (base
    // pointer, then length), and the assertion above checks size and alignment.
    unsafe { std::slice::from_raw_parts(segs.as_ptr().cast::<libc::iovec>(), segs.len()) }
}

impl MemRef {
    /// A reference to `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The range must stay valid (allocated, and writable if a read request fills
    /// it) until every device request that uses it has completed, and no Rust
    /// reference may access it meanwhile.
    pub unsafe fn from_raw(ptr: *mut u8, len: usize) -> Self {
        MemRef { ptr, len }
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.ptr as usize
    }
    /// Start pointer, for device back ends.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The sub-range `[start, start + len)`.
    ///
    /// # Panics
    /// If the sub-range does not lie inside this one.
    pub fn slice(&self, start: usize, len: usize) -> MemRef {
        assert!(
            start <= self.len && len <= self.len - start,
            "MemRef::slice out of range"
        );
        MemRef {
            ptr: self.ptr.wrapping_add(start),
            len,
        }
    }
    /// Whether `next` starts where this range ends.
    pub fn is_followed_by(&self, next: &MemRef) -> bool {
        self.ptr.wrapping_add(self.len) == next.ptr
    }
    /// This range and `next`, which starts where this one ends, as one range (the
    /// request builder's merge). Crate-private: a longer range than its creator lent
    /// is memory nobody vouched for.
    pub(crate) fn joined(&self, next: &MemRef) -> MemRef {
        debug_assert!(self.is_followed_by(next));
        MemRef {
            ptr: self.ptr,
            len: self.len + next.len,
        }
    }

    /// Fill the range with zeros (a read of a hole).
    ///
    /// Only for memory that a read request owns, inside its scope.
    pub(crate) fn zero(&self) {
        // SAFETY: the creator of this MemRef guaranteed the range is valid and not
        // referenced elsewhere while the request runs; reads fill it.
        unsafe { std::ptr::write_bytes(self.ptr, 0, self.len) }
    }

    /// Copy the range's bytes out (device back ends serving a write).
    ///
    /// # Safety
    /// The range must be valid for reads (the request that carries it is live).
    pub unsafe fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.len);
        // SAFETY: caller guarantees validity; dst is a distinct &mut.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, dst.as_mut_ptr(), self.len) }
    }

    /// Copy `src` into the range (device back ends serving a read).
    ///
    /// # Safety
    /// The range must be valid for writes (the request that carries it is live).
    pub unsafe fn copy_from(&self, src: &[u8]) {
        assert_eq!(src.len(), self.len);
        // SAFETY: caller guarantees validity; src is a distinct &.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, self.len) }
    }
}

/// Alignment used for the shared zero buffer: enough for any device's memory
/// alignment (a page).
const ZERO_ALIGN: usize = 4096;
/// Size of the shared zero buffer: the largest fs block dio supports.
pub(crate) const ZERO_LEN: usize = 64 * 1024;

/// A read-only range of zeros for writing zeroes to the device (the seed's
/// ZERO_PAGE), at most [`ZERO_LEN`] bytes.
pub(crate) fn zeroes(len: usize) -> MemRef {
    static ZEROES: std::sync::OnceLock<AlignedBuf> = std::sync::OnceLock::new();
    let buf = ZEROES.get_or_init(|| AlignedBuf::new(ZERO_LEN, ZERO_ALIGN));
    assert!(len <= ZERO_LEN);
    // Devices only read from it (it is used for writes only), so the shared buffer is
    // never written; the pointer cast to *mut is never written through.
    MemRef {
        ptr: buf.as_ptr() as *mut u8,
        len,
    }
}

/// One scope's claim counter: every request over the scope's borrowed memory holds a
/// clone of the scope's `Arc<Tracker>`, so the scope is drained when it holds the
/// only reference left (one atomic increment and decrement per request, nothing
/// more). Aligned to 128 bytes: its count is written by every call of its thread,
/// and must not share a cache line with a neighbour another thread uses (see the
/// engine's `Dio`).
#[repr(align(128))]
pub(crate) struct Tracker;

/// A request's claim on a scope's borrowed memory: the scope does not end while one
/// lives. Held by the request (and its [`crate::device::Finished`]) until the
/// completion is done with it.
pub(crate) struct Ticket(
    #[allow(dead_code, reason = "held for its count")] std::sync::Arc<Tracker>,
);

/// Lends borrowed memory to device requests and keeps it borrowed until every such
/// request is gone.
///
/// Obtained only inside [`io_scope`], which returns (or unwinds, when its body
/// panics) only after every request built over the scope's memory has completed and
/// been dropped, whatever the body did: the wait is on the requests themselves, not
/// on a promise of the caller. The scope and the memory references it lends are
/// crate-private: the engine is the only code that builds requests over borrowed
/// memory.
pub(crate) struct IoScope<'a> {
    tracker: std::sync::Arc<Tracker>,
    _borrow: std::marker::PhantomData<&'a mut [u8]>,
}

impl<'a> IoScope<'a> {
    /// Memory references for a caller's read buffers, kept alive by the scope.
    /// No copy: the slices are viewed in place.
    pub(crate) fn lend_mut(&self, bufs: &'a mut [std::io::IoSliceMut<'_>]) -> &'a [MemRef] {
        // SAFETY: IoSliceMut is documented to be ABI compatible with `struct iovec`
        // on Unix, and MemRef is a repr(C) {pointer, length} pair with the same
        // layout; the exclusive borrow for 'a keeps the buffers alive and unaliased
        // for the scope, which waits for every request over them before it ends.
        unsafe { std::slice::from_raw_parts(bufs.as_ptr().cast::<MemRef>(), bufs.len()) }
    }

    /// A memory reference for one buffer (a bounce buffer, say), kept alive by the
    /// scope. Reads fill it; writes read from it.
    pub(crate) fn lend_buf(&self, buf: &'a mut [u8]) -> MemRef {
        MemRef {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// Memory references for a caller's write buffers, kept alive by the scope.
    /// Devices only read from them.
    pub(crate) fn lend(&self, bufs: &'a [std::io::IoSlice<'_>]) -> &'a [MemRef] {
        // SAFETY: as in lend_mut (IoSlice is iovec-compatible too); devices only
        // read through these references, for writes.
        unsafe { std::slice::from_raw_parts(bufs.as_ptr().cast::<MemRef>(), bufs.len()) }
    }

    /// Who keeps the memory of requests built over this scope's loans: the scope.
    pub(crate) fn lender(&self) -> Lender<'_> {
        Lender::Scope(&self.tracker)
    }
}

/// Who keeps the memory of the requests an engine call builds.
#[derive(Clone, Copy)]
pub(crate) enum Lender<'s> {
    /// An [`IoScope`]: each request takes a ticket the scope waits for.
    Scope(&'s std::sync::Arc<Tracker>),
    /// The call itself: it owns the buffers and gives them back only after every
    /// request over them has completed.
    Owned,
}

impl Lender<'_> {
    /// What a new request over this memory carries.
    #[inline]
    pub(crate) fn keep(&self) -> crate::device::Keep {
        match self {
            Lender::Scope(t) => crate::device::Keep::Lent(Ticket(std::sync::Arc::clone(t))),
            Lender::Owned => crate::device::Keep::Vouched,
        }
    }
}

/// Run `body` with a scope that lends borrowed memory to device requests. When `body`
/// returns or panics, wait until every request holding one of the scope's tickets is
/// gone, calling `progress` between checks (it polls a device whose completions need
/// polling; it may do nothing). A body that leaks a request never returns: a hang,
/// never memory handed back while a device may still use it.
///
/// The engine's own wait has normally seen every request complete by then (a
/// request's ticket goes before its completion wakes the engine), so the check costs
/// one load; only after a panic does the scope itself wait, briefly spinning, then
/// sleeping in short steps.
pub(crate) fn io_scope<'a, R>(
    mut progress: impl FnMut(),
    body: impl FnOnce(&IoScope<'a>) -> R,
) -> R {
    struct Drain<'s, 'a, F: FnMut()> {
        scope: &'s IoScope<'a>,
        progress: F,
    }
    impl<F: FnMut()> Drop for Drain<'_, '_, F> {
        fn drop(&mut self) {
            let t = &self.scope.tracker;
            let mut spins = 0u32;
            while std::sync::Arc::strong_count(t) > 1 {
                (self.progress)();
                if spins < 64 {
                    spins += 1;
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        }
    }
    // A drained tracker is reused by the thread's next scope: no allocation per call.
    thread_local! {
        static SPARE: std::cell::Cell<Option<std::sync::Arc<Tracker>>> =
            const { std::cell::Cell::new(None) };
    }
    let tracker = SPARE
        .with(|s| s.take())
        .unwrap_or_else(|| std::sync::Arc::new(Tracker));
    let scope = IoScope {
        tracker,
        _borrow: std::marker::PhantomData,
    };
    let drain = Drain {
        scope: &scope,
        progress: &mut progress,
    };
    let r = body(drain.scope);
    drop(drain);
    let IoScope { tracker, .. } = scope;
    if std::sync::Arc::strong_count(&tracker) == 1 {
        SPARE.with(|s| s.set(Some(tracker)));
    }
    r
}

/// Memory references for owned async buffers. The engine holds `bufs` until every
/// request over them has completed, which the [`OwnedBuf`] contract makes
/// sufficient. One buffer, the common case, needs no allocation.
pub(crate) fn lend_owned<B: OwnedBuf>(bufs: &mut [B]) -> Segments {
    bufs.iter_mut().map(lend_one).collect()
}

/// The memory reference of one owned buffer.
pub(crate) fn lend_one<B: OwnedBuf>(buf: &mut B) -> MemRef {
    MemRef {
        ptr: buf.as_mut_ptr(),
        len: buf.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AnonHugePages of the mapping that contains `addr`, from /proc/self/smaps.
    fn huge_kb_at(addr: usize) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("AnonHugePages:") {
                    return v.trim().trim_end_matches(" kB").trim().parse().ok();
                }
            }
        }
        None
    }

    #[test]
    fn one_mib_buffers_share_huge_pages_and_start_zeroed() {
        let mut a = AlignedBuf::new(HALF, 4096);
        let mut b = AlignedBuf::new(HALF, 4096);
        for x in [&a, &b] {
            assert_eq!(x.as_ptr() as usize % HALF, 0);
            assert!(x.iter().all(|&v| v == 0));
        }
        a.fill(0xff);
        b.fill(0xee);
        assert!(a.iter().all(|&v| v == 0xff), "two buffers overlap");
        drop(a);
        // Whichever half it gets (maybe a's), a new buffer starts zeroed.
        let c = AlignedBuf::new(HALF, 4096);
        assert!(c.iter().all(|&v| v == 0));
        assert!(b.iter().all(|&v| v == 0xee));
    }

    #[test]
    fn halves_are_never_handed_out_twice() {
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                std::thread::spawn(move || {
                    for round in 0..40u8 {
                        let mut held: Vec<AlignedBuf> =
                            (0..3).map(|_| AlignedBuf::new(HALF, 512)).collect();
                        let mark = t.wrapping_mul(64).wrapping_add(round) | 1;
                        for b in &mut held {
                            assert!(b.iter().all(|&v| v == 0), "not zeroed");
                            b.fill(mark);
                        }
                        std::thread::yield_now();
                        for b in &held {
                            assert!(b.iter().all(|&v| v == mark), "shared with another");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn large_buffers_sit_in_huge_pages() {
        for len in [HALF + 1, 3 << 20, (4 << 20) + 512] {
            let mut b = AlignedBuf::new(len, 4096);
            assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0, "len {len}");
            assert!(b.iter().all(|&x| x == 0));
            b.fill(0x5a);
            assert!(b.iter().all(|&x| x == 0x5a));
            let c = b.clone();
            assert_eq!(&c[..], &b[..]);
        }
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if thp.contains("[never]") || thp.is_empty() {
            eprintln!("skipping the huge-page check: transparent huge pages are off here");
            return;
        }
        let mut b = AlignedBuf::new(4 << 20, 4096);
        b.fill(1);
        let kb = huge_kb_at(b.as_ptr() as usize).unwrap_or(0);
        let defrag = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/defrag")
            .unwrap_or_default();
        if defrag.contains("[madvise]") || defrag.contains("[always]") {
            // The fault compacts memory for an advised range, so a huge page is found.
            assert!(kb > 0, "a 4 MiB buffer got no huge page");
        } else {
            eprintln!("note: huge pages without direct compaction here: {kb} kB");
        }
    }

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        for align in [1, 512, 4096, 65536] {
            let b = AlignedBuf::new(12345, align);
            assert_eq!(b.as_ptr() as usize % align, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
        let e = AlignedBuf::new(0, 4096);
        assert_eq!(e.len(), 0);
        assert_eq!(e.as_ptr() as usize % 4096, 0);
    }

    #[test]
    fn memref_slices_and_contiguity() {
        let mut b = AlignedBuf::new(8192, 4096);
        // SAFETY: b outlives every use of m in this test.
        let m = unsafe { MemRef::from_raw(b.as_mut_ptr(), 8192) };
        let a = m.slice(0, 4096);
        let c = m.slice(4096, 4096);
        assert!(a.is_followed_by(&c));
        assert!(!c.is_followed_by(&a));
        assert_eq!(a.joined(&c), m);
    }
}
