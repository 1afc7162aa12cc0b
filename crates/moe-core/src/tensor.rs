//! Tensors at the boundary: borrowed views of caller memory in, owned buffers out.
//!
//! Inputs arrive as bytes plus a dtype name and a shape (a binding never has to know which
//! element type an op wants); [`TensorRef`] checks that the three agree and hands out typed
//! slices. Outputs are [`Tensor`]s whose [`Data`] is already typed, so a binding can give the
//! buffer to JavaScript as the matching TypedArray without copying or re-casting.

use std::borrow::Cow;

use bytemuck::Pod;
use half::{bf16, f16};

use crate::error::{size_arg, Error, Result};

/// Element types understood by moe-dispatch. Names follow the JavaScript facade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    I32,
    I64,
    Bool,
}

impl DType {
    pub const ALL: [DType; 6] = [DType::F32, DType::BF16, DType::F16, DType::I32, DType::I64, DType::Bool];

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::Bool => "bool",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I64 => 8,
            DType::Bool => 1,
        }
    }

    pub fn parse(arg: &str, name: &str) -> Result<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name).ok_or_else(|| {
            Error::type_error(format!("{arg}.dtype"), "one of float32, bfloat16, float16, int32, int64, bool", format!("'{name}'"))
        })
    }

    /// Floating-point types that tokens may have.
    pub const TOKENS: &'static [DType] = &[DType::F32, DType::BF16, DType::F16];
    /// Integer types accepted for indices.
    pub const INDICES: &'static [DType] = &[DType::I32, DType::I64];
}

fn dtype_list(dtypes: &[DType]) -> String {
    let names: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
    match names.len() {
        1 => names[0].to_string(),
        _ => format!("{} or {}", names[..names.len() - 1].join(", "), names[names.len() - 1]),
    }
}

fn shape_string(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

/// A borrowed, validated view of an input tensor. `name` is the argument name used in errors.
#[derive(Debug, Clone)]
pub struct TensorRef<'a> {
    pub name: &'static str,
    pub dtype: DType,
    pub shape: Vec<usize>,
    bytes: &'a [u8],
}

impl<'a> TensorRef<'a> {
    /// Builds a view from what a binding received; checks that the shape holds integers and
    /// that the byte length matches `product(shape) * dtype.size()`.
    pub fn from_parts(name: &'static str, dtype: &str, shape: &[f64], bytes: &'a [u8]) -> Result<Self> {
        let dtype = DType::parse(name, dtype)?;
        let mut dims = Vec::with_capacity(shape.len());
        for (i, &d) in shape.iter().enumerate() {
            dims.push(size_arg(&format!("{name}.shape[{i}]"), d)?);
        }
        Self::new(name, dtype, dims, bytes)
    }

    pub fn new(name: &'static str, dtype: DType, shape: Vec<usize>, bytes: &'a [u8]) -> Result<Self> {
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| Error::range(format!("{name}.shape"), format!("{} overflows the address space", shape_string(&shape))))?;
        if numel != bytes.len() {
            return Err(Error::range(
                format!("{name}.data"),
                format!("shape {} of {} needs {} bytes, got {}", shape_string(&shape), dtype.name(), numel, bytes.len()),
            ));
        }
        Ok(TensorRef { name, dtype, shape, bytes })
    }

    /// A view of a typed slice (for Rust callers and tests).
    pub fn of<T: Element>(name: &'static str, shape: Vec<usize>, data: &'a [T]) -> Result<Self> {
        Self::new(name, T::DTYPE, shape, bytemuck::cast_slice(data))
    }

    pub fn numel(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// What the per-op checks look at: name, dtype, shape and (here, on the host) the elements.
    pub fn meta(&self) -> Meta<'_> {
        Meta { name: self.name, dtype: self.dtype, shape: &self.shape, host: Some(self.bytes) }
    }

    pub fn expect_dtype(&self, allowed: &[DType]) -> Result<DType> {
        self.meta().expect_dtype(allowed)
    }

    /// Checks the rank and returns the dims; `what` describes the dims, e.g. "[numTokens, hidden]".
    pub fn expect_rank(&self, rank: usize, what: &str) -> Result<&[usize]> {
        self.meta().expect_rank(rank, what)?;
        Ok(&self.shape)
    }

    /// Checks the shape exactly; `what` describes it, e.g. "[numTokens, numExperts]".
    pub fn expect_shape(&self, shape: &[usize], what: &str) -> Result<()> {
        self.meta().expect_shape(shape, what)
    }

    /// The elements as `T`, borrowed when the bytes are aligned, copied when they are not.
    pub fn typed<T: Element>(&self) -> Result<Cow<'a, [T]>> {
        self.expect_dtype(&[T::DTYPE])?;
        Ok(self.raw())
    }

    /// The elements reinterpreted as `T` of the same width, whatever the dtype (for copies
    /// that move bits without looking at them). Borrowed when aligned, copied when not.
    pub fn raw<T: Pod>(&self) -> Cow<'a, [T]> {
        debug_assert_eq!(std::mem::size_of::<T>(), self.dtype.size());
        match bytemuck::try_cast_slice(self.bytes) {
            Ok(slice) => Cow::Borrowed(slice),
            Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(self.bytes)),
        }
    }

    /// A bool tensor as one byte per element; every byte must be 0 or 1.
    pub fn mask(&self) -> Result<&'a [u8]> {
        self.meta().check_mask()?;
        Ok(self.bytes)
    }

    /// An int32 or int64 tensor widened to i64.
    pub fn indices(&self) -> Result<Cow<'a, [i64]>> {
        match self.expect_dtype(DType::INDICES)? {
            DType::I64 => self.typed::<i64>(),
            _ => Ok(Cow::Owned(self.typed::<i32>()?.iter().map(|&v| v as i64).collect())),
        }
    }
}

/// Bytes a block of a bool mask's check (`Meta::check_mask`) and count (`mask_ones`).
const MASK_BLOCK: usize = 255;

/// The ones of a bool mask whose bytes are 0 or 1 (`Meta::check_mask` passed): summed in u8
/// lanes by blocks of 255 bytes (a loop the compiler vectorises), the blocks' sums added.
pub fn mask_ones(bytes: &[u8]) -> usize {
    bytes.chunks(MASK_BLOCK).map(|c| c.iter().fold(0u8, |a, &b| a.wrapping_add(b)) as usize).sum()
}

/// A caller-owned output (`out` of permute, unpermute, permuteBackward): the op checks its dtype
/// and shape against what it would have allocated, checks that its bytes share no memory with
/// an input, and only then overwrites every element. `name` is its name in errors
/// (`out.permutedTokens`).
#[derive(Debug)]
pub struct TensorMut<'a> {
    pub name: &'static str,
    pub dtype: DType,
    pub shape: Vec<usize>,
    bytes: &'a mut [u8],
}

impl<'a> TensorMut<'a> {
    /// Builds a view from what a binding received (the checks of [`TensorRef::from_parts`]).
    pub fn from_parts(name: &'static str, dtype: &str, shape: &[f64], bytes: &'a mut [u8]) -> Result<Self> {
        let dtype = DType::parse(name, dtype)?;
        let mut dims = Vec::with_capacity(shape.len());
        for (i, &d) in shape.iter().enumerate() {
            dims.push(size_arg(&format!("{name}.shape[{i}]"), d)?);
        }
        Self::new(name, dtype, dims, bytes)
    }

    pub fn new(name: &'static str, dtype: DType, shape: Vec<usize>, bytes: &'a mut [u8]) -> Result<Self> {
        TensorRef::new(name, dtype, shape.clone(), bytes)?;
        Ok(TensorMut { name, dtype, shape, bytes })
    }

    /// A view of a typed slice (for Rust callers and tests).
    pub fn of<T: Element>(name: &'static str, shape: Vec<usize>, data: &'a mut [T]) -> Result<Self> {
        Self::new(name, T::DTYPE, shape, bytemuck::cast_slice_mut(data))
    }

    /// Checks that this output is what the op would return: `dtype` (a TypeError) and `shape`
    /// (a RangeError), each described by `what` (e.g. "(the dtype of tokens)").
    pub fn expect(&self, dtype: DType, shape: &[usize], what: &str) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::type_error(format!("{}.dtype", self.name), format!("{} {what}", dtype.name()), self.dtype.name()));
        }
        Meta::shape_only(self.name, self.dtype, &self.shape).expect_shape(shape, what)
    }

    /// A RangeError when these bytes share memory with `input`'s (an input read while it is
    /// overwritten would give wrong results). Empty tensors share nothing.
    pub fn expect_disjoint(&self, input: &[u8], input_name: &str) -> Result<()> {
        let (a, b) = (self.bytes.as_ptr() as usize, input.as_ptr() as usize);
        if !self.bytes.is_empty() && !input.is_empty() && a < b + input.len() && b < a + self.bytes.len() {
            return Err(Error::range(
                self.name,
                format!("its memory overlaps {input_name}'s; an output must not share memory with an input or another output"),
            ));
        }
        Ok(())
    }

    /// The bytes, to compare with another output's.
    pub fn bytes(&self) -> &[u8] {
        self.bytes
    }

    /// Hands the elements to `f` as `T` of the dtype's width, holding their current values, for
    /// an op that overwrites them where it likes (a GEMM's output): in place when the bytes are
    /// aligned for `T`, else through a temporary copy written back afterwards.
    pub fn modify<T: Pod, R>(&mut self, f: impl FnOnce(&mut [T]) -> R) -> R {
        debug_assert_eq!(std::mem::size_of::<T>(), self.dtype.size());
        match bytemuck::try_cast_slice_mut::<u8, T>(self.bytes) {
            Ok(slice) => f(slice),
            Err(_) => {
                let mut v: Vec<T> = bytemuck::pod_collect_to_vec(self.bytes);
                let r = f(&mut v);
                self.bytes.copy_from_slice(bytemuck::cast_slice(&v));
                r
            }
        }
    }

    /// Hands every element to `fill` (which must write all of them) as `T` of the dtype's
    /// width: in place when the bytes are aligned for `T`, else through a temporary copy.
    pub fn fill<T: Pod>(&mut self, fill: impl FnOnce(&mut [std::mem::MaybeUninit<T>])) {
        debug_assert_eq!(std::mem::size_of::<T>(), self.dtype.size());
        match bytemuck::try_cast_slice_mut::<u8, T>(self.bytes) {
            Ok(slice) => {
                // SAFETY: MaybeUninit<T> has the layout of T, and `fill` only writes initialised values.
                let uninit = unsafe { &mut *(slice as *mut [T] as *mut [std::mem::MaybeUninit<T>]) };
                fill(uninit)
            }
            Err(_) => {
                let v = crate::alloc::filled_vec::<T>(self.bytes.len() / std::mem::size_of::<T>(), fill);
                self.bytes.copy_from_slice(bytemuck::cast_slice(&v));
            }
        }
    }
}

/// A tensor argument as the per-op checks see it: its name, dtype and shape, and its elements
/// when they are on the host.
///
/// Every op's checks (`check_*` in its module) take `Meta`s and return what a kernel needs (the
/// sizes, the mode), with the op's own errors: the CPU op calls them on its [`TensorRef`]s
/// ([`TensorRef::meta`], elements included, so bool values, index ranges and finite biases are
/// checked where the op always checked them), and a backend whose tensors live elsewhere (the
/// CUDA crate) on [`Meta::shape_only`], which skips the element checks (its kernels flag those,
/// and the core reports them on the host).
#[derive(Debug, Clone, Copy)]
pub struct Meta<'a> {
    pub name: &'static str,
    pub dtype: DType,
    pub shape: &'a [usize],
    host: Option<&'a [u8]>,
}

impl<'a> Meta<'a> {
    /// An argument whose elements are not on the host: only its dtype and shape are checked.
    pub fn shape_only(name: &'static str, dtype: DType, shape: &'a [usize]) -> Meta<'a> {
        Meta { name, dtype, shape, host: None }
    }

    /// The elements' bytes, when they are on the host.
    pub fn host_bytes(&self) -> Option<&'a [u8]> {
        self.host
    }

    pub fn expect_dtype(&self, allowed: &[DType]) -> Result<DType> {
        if allowed.contains(&self.dtype) {
            Ok(self.dtype)
        } else {
            Err(Error::type_error(format!("{}.dtype", self.name), dtype_list(allowed), self.dtype.name()))
        }
    }

    /// Checks the rank and returns the dims; `what` describes the dims, e.g. "[numTokens, hidden]".
    pub fn expect_rank(&self, rank: usize, what: &str) -> Result<&'a [usize]> {
        if self.shape.len() == rank {
            Ok(self.shape)
        } else {
            Err(Error::type_error(format!("{}.shape", self.name), format!("a {rank}-d shape {what}"), shape_string(self.shape)))
        }
    }

    /// Checks the shape exactly; `what` describes it, e.g. "[numTokens, numExperts]".
    pub fn expect_shape(&self, shape: &[usize], what: &str) -> Result<()> {
        if self.shape == shape {
            Ok(())
        } else {
            Err(Error::range(
                format!("{}.shape", self.name),
                format!("expected {} {}, got {}", shape_string(shape), what, shape_string(self.shape)),
            ))
        }
    }

    /// A bool tensor; on the host every byte must be 0 or 1.
    pub fn check_mask(&self) -> Result<()> {
        self.expect_dtype(&[DType::Bool])?;
        if let Some(bytes) = self.host {
            // blocks OR-ed (a loop the compiler vectorises) before the search for the first bad byte
            let block = bytes.chunks(MASK_BLOCK).position(|c| c.iter().fold(0u8, |a, &b| a | b) > 1);
            if let Some(i) = block.and_then(|k| bytes[k * MASK_BLOCK..].iter().position(|&b| b > 1).map(|j| k * MASK_BLOCK + j)) {
                return Err(Error::range(
                    format!("{}.data", self.name),
                    format!("a bool tensor holds {} at element {i}; expected 0 or 1", bytes[i]),
                ));
            }
        }
        Ok(())
    }

    /// An int32 or int64 tensor; on the host the index and value of the first element for
    /// which `pred` holds (`pred` sees the elements in order, widened to i64).
    pub fn find_index(&self, mut pred: impl FnMut(i64) -> bool) -> Result<Option<(usize, i64)>> {
        self.expect_dtype(DType::INDICES)?;
        let Some(bytes) = self.host else { return Ok(None) };
        Ok(match self.dtype {
            DType::I64 => bytes.chunks_exact(8).map(|b| i64::from_ne_bytes(b.try_into().unwrap())).enumerate().find(|&(_, v)| pred(v)),
            _ => bytes.chunks_exact(4).map(|b| i32::from_ne_bytes(b.try_into().unwrap()) as i64).enumerate().find(|&(_, v)| pred(v)),
        })
    }

    /// An int32 or int64 tensor; on the host the index of the first element outside `0..bound`.
    pub fn first_outside(&self, bound: usize) -> Result<Option<(usize, i64)>> {
        self.find_index(|v| v < 0 || v as u64 >= bound as u64)
    }

    /// An int32 or int64 tensor's elements widened to i64, when they are on the host.
    pub fn index_values(&self) -> Result<Option<Vec<i64>>> {
        let mut values = Vec::new();
        self.find_index(|v| {
            values.push(v);
            false
        })?;
        Ok(self.host.map(|_| values))
    }

    /// A float32 tensor; on the host the index and value of the first non-finite element.
    pub fn first_non_finite(&self) -> Result<Option<(usize, f32)>> {
        self.expect_dtype(&[DType::F32])?;
        let Some(bytes) = self.host else { return Ok(None) };
        Ok(bytes.chunks_exact(4).map(|b| f32::from_ne_bytes(b.try_into().unwrap())).enumerate().find(|(_, v)| !v.is_finite()))
    }
}

/// Rust element types that correspond to a [`DType`].
pub trait Element: Pod + Send + Sync {
    const DTYPE: DType;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}

/// Floating-point token elements: converted to f32 for arithmetic, rounded once on the way back.
pub trait Float: Element {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}
impl Float for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl Float for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    /// Round to nearest, ties to even; NaN stays a (quiet) NaN. Written without branches
    /// on the value so that the merge loops vectorise.
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        let b = v.to_bits();
        let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
        let quiet_nan = ((b >> 16) | 0x40) as u16;
        bf16::from_bits(if v.is_nan() { quiet_nan } else { rounded })
    }
}
impl Float for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Owned, typed storage of an output tensor. 16-bit floats are kept as their bits.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    U16(Vec<u16>),
    I32(Vec<i32>),
    Bool(Vec<u8>),
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::U16(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements, when they are f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        if let Data::F32(v) = self {
            Some(v)
        } else {
            None
        }
    }

    /// The elements, when they are int32.
    pub fn as_i32(&self) -> Option<&[i32]> {
        if let Data::I32(v) = self {
            Some(v)
        } else {
            None
        }
    }

    /// The bits, when they are 16-bit floats.
    pub fn as_u16(&self) -> Option<&[u16]> {
        if let Data::U16(v) = self {
            Some(v)
        } else {
            None
        }
    }

    /// The bytes, when the tensor is bool.
    pub fn as_bool(&self) -> Option<&[u8]> {
        if let Data::Bool(v) = self {
            Some(v)
        } else {
            None
        }
    }
}

/// An owned output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { dtype: DType::F32, shape, data: Data::F32(data) }
    }

    pub fn i32(shape: Vec<usize>, data: Vec<i32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { dtype: DType::I32, shape, data: Data::I32(data) }
    }

    pub fn bool(shape: Vec<usize>, data: Vec<u8>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { dtype: DType::Bool, shape, data: Data::Bool(data) }
    }

    /// A 16-bit float tensor (bfloat16 or float16) from its bits.
    pub fn u16(dtype: DType, shape: Vec<usize>, bits: Vec<u16>) -> Tensor {
        debug_assert!(matches!(dtype, DType::BF16 | DType::F16));
        debug_assert_eq!(shape.iter().product::<usize>(), bits.len());
        Tensor { dtype, shape, data: Data::U16(bits) }
    }

    /// Wraps a buffer of token elements (f32, bf16 or f16) with its dtype.
    pub fn from_elements<T: Float>(shape: Vec<usize>, data: Vec<T>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        let data = match T::DTYPE {
            DType::F32 => Data::F32(bytemuck::allocation::cast_vec(data)),
            // bf16 and f16 have the size and alignment of u16, so the Vec is reinterpreted in place.
            _ => Data::U16(bytemuck::allocation::cast_vec(data)),
        };
        Tensor { dtype: T::DTYPE, shape, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_parts_checks_dtype_shape_and_length() {
        let bytes = [0u8; 24];
        let t = TensorRef::from_parts("tokens", "float32", &[2.0, 3.0], &bytes).unwrap();
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.numel(), 6);

        let err = TensorRef::from_parts("tokens", "float64", &[2.0, 3.0], &bytes).unwrap_err();
        assert_eq!(err.to_string(), "tokens.dtype: expected one of float32, bfloat16, float16, int32, int64, bool, got 'float64'");
        let err = TensorRef::from_parts("tokens", "float32", &[2.0, 4.0], &bytes).unwrap_err();
        assert_eq!(err.to_string(), "tokens.data: shape [2, 4] of float32 needs 32 bytes, got 24");
        let err = TensorRef::from_parts("tokens", "float32", &[2.5, 4.0], &bytes).unwrap_err();
        assert!(err.to_string().starts_with("tokens.shape[0]:"), "{err}");
    }

    #[test]
    fn typed_copies_unaligned_bytes() {
        let src: Vec<u8> = (0u8..9).collect();
        let view = TensorRef::new("x", DType::F32, vec![2], &src[1..9]).unwrap();
        let typed = view.typed::<f32>().unwrap();
        assert_eq!(typed.len(), 2);
        assert_eq!(typed[0].to_bits().to_le_bytes(), [1, 2, 3, 4]);
    }

    #[test]
    fn check_mask_and_mask_ones_agree_with_the_plain_loops() {
        // lengths around the block size, a bad byte (2, 255) at each place a block split could hide it,
        // the first named where a later one follows
        let mut seed = 0x9e37_79b9u32;
        for len in [0usize, 1, 254, 255, 256, 509, 510, 511, 4096, 70_001] {
            let mut bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    u8::from(seed >> 29 == 0)
                })
                .collect();
            let shape = [len];
            let meta = Meta { name: "routingMap", dtype: DType::Bool, shape: &shape, host: Some(&bytes) };
            assert!(meta.check_mask().is_ok());
            assert_eq!(mask_ones(&bytes), bytes.iter().filter(|&&b| b == 1).count(), "len {len}");
            for at in [0, 253, 254, 255, 256, 509, 510, len / 2, len.saturating_sub(1)] {
                if at >= len {
                    continue;
                }
                for bad in [2u8, 255] {
                    let mut b = bytes.clone();
                    b[at] = bad;
                    if at + 1 < len {
                        b[len - 1] = 3; // a later bad byte: the first one is named
                    }
                    let meta = Meta { name: "routingMap", dtype: DType::Bool, shape: &shape, host: Some(&b) };
                    let err = meta.check_mask().unwrap_err().to_string();
                    assert_eq!(err, format!("routingMap.data: a bool tensor holds {bad} at element {at}; expected 0 or 1"));
                }
            }
            bytes.clear();
        }
        // full blocks of ones: a block's u8 sum at its largest
        assert_eq!(mask_ones(&[1u8; 70_001]), 70_001);
    }

    #[test]
    fn bf16_conversion_matches_the_half_crate() {
        // Every 4099th bit pattern over the whole f32 range, NaNs and infinities included.
        for bits in (0..=u32::MAX).step_by(4099).chain([0x7f80_0000, 0xff80_0000, 0x7fc0_0000, 0x3f80_8000, 0x3f81_8000]) {
            let v = f32::from_bits(bits);
            let ours = <bf16 as Float>::from_f32(v);
            let theirs = bf16::from_f32(v);
            if v.is_nan() {
                assert!(ours.is_nan(), "{bits:#x}");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{bits:#x}");
            }
            assert_eq!(<bf16 as Float>::to_f32(theirs).to_bits(), theirs.to_f32().to_bits());
        }
    }
}
