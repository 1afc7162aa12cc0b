//! Device tensors: a buffer on the GPU with its dtype and shape. Upload from a host tensor,
//! download to one; the buffer is freed when the tensor is dropped (stream-ordered, so queued
//! kernels that read it finish first).
//!
//! int64 is not kept on the GPU (the kernels index with int32): uploading an int64 tensor is
//! a TypeError that says so.

use std::sync::Arc;

use moe_core::tensor::{DType, Data, Meta, Tensor, TensorRef};

use crate::device::{Buffer, Device};
use crate::error::{Error, Result};
use crate::permute::DevicePlan;

/// A tensor in GPU memory.
pub struct DeviceTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub buf: Buffer,
    /// For the sortedIndices that permute made on the GPU: its plan (the token CSR), which
    /// unpermute reuses instead of rebuilding it.
    pub plan: Option<Arc<DevicePlan>>,
    /// What is known of the values without reading them (set by the op that made them; device
    /// tensors are never written in place by the ops), so that later ops can skip their checks.
    pub facts: Facts,
}

/// What an op established about the values of the tensor it made (see [`DeviceTensor::facts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// route's indices: each row's picks are distinct experts below `experts`, made from the
    /// logits buffer `logits` (whose values route checked: finite) with the token mask buffer
    /// `mask`; `full`: no pick is -1.
    pub picks: Option<Picks>,
    /// A routing map with exactly this many true entries.
    pub true_entries: Option<usize>,
    /// Counts (tokensPerExpert) that add up to exactly this, each >= 0 (permute's).
    pub counts_total: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Picks {
    pub experts: usize,
    pub logits: u64,
    pub mask: Option<u64>,
    pub full: bool,
}

impl DeviceTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// What the core's per-op checks look at: dtype and shape (the elements stay on the GPU).
    pub fn meta(&self, name: &'static str) -> Meta<'_> {
        Meta::shape_only(name, self.dtype, &self.shape)
    }

    /// A new, uninitialised tensor. `what` names it in an out-of-memory error.
    pub fn alloc(dev: &Device, what: &str, dtype: DType, shape: Vec<usize>) -> Result<DeviceTensor> {
        let bytes = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::Cuda(format!("{what}: shape {shape:?} overflows")))?;
        Ok(DeviceTensor::from_buffer(dtype, shape, dev.alloc(what, bytes)?))
    }

    /// Wraps a buffer that holds `shape` elements of `dtype`.
    pub fn from_buffer(dtype: DType, shape: Vec<usize>, buf: Buffer) -> DeviceTensor {
        DeviceTensor { dtype, shape, buf, plan: None, facts: Facts::default() }
    }

    /// Copies a host tensor to the GPU.
    pub fn upload(dev: &Device, t: &TensorRef) -> Result<DeviceTensor> {
        if t.dtype == DType::I64 {
            return Err(Error::Core(moe_core::Error::type_error(
                format!("{}.dtype", t.name),
                "float32, bfloat16, float16, int32 or bool (the GPU keeps no int64 tensors: convert indices to int32)",
                "int64",
            )));
        }
        Ok(DeviceTensor::from_buffer(t.dtype, t.shape.clone(), dev.upload(t.name, t.bytes())?))
    }

    /// Copies an owned host tensor to the GPU.
    pub fn upload_owned(dev: &Device, what: &str, t: &Tensor) -> Result<DeviceTensor> {
        Ok(DeviceTensor::from_buffer(t.dtype, t.shape.clone(), dev.upload(what, tensor_bytes(t))?))
    }

    /// Copies the tensor to the host (waits for the kernels that write it).
    pub fn download(&self, dev: &Device, what: &str) -> Result<Tensor> {
        let n = self.numel();
        let shape = self.shape.clone();
        Ok(match self.dtype {
            DType::F32 => Tensor::f32(shape, dev.download_new(what, &self.buf, n)?),
            DType::BF16 | DType::F16 => Tensor::u16(self.dtype, shape, dev.download_new(what, &self.buf, n)?),
            DType::I32 => Tensor::i32(shape, dev.download_new(what, &self.buf, n)?),
            DType::Bool => Tensor::bool(shape, dev.download_new(what, &self.buf, n)?),
            DType::I64 => return Err(Error::Cuda(format!("{what}: int64 on the GPU (a bug in moe-dispatch)"))),
        })
    }
}

/// A device tensor under its argument's name (as a [`TensorRef`] carries its name): what the
/// bindings hand the device entries, and what the core's checks see ([`DeviceArg::meta`]).
#[derive(Clone, Copy)]
pub struct DeviceArg<'a> {
    pub name: &'static str,
    pub tensor: &'a DeviceTensor,
}

impl<'a> DeviceArg<'a> {
    pub fn meta(&self) -> Meta<'a> {
        self.tensor.meta(self.name)
    }
}

impl std::ops::Deref for DeviceArg<'_> {
    type Target = DeviceTensor;
    fn deref(&self) -> &DeviceTensor {
        self.tensor
    }
}

/// The bytes of an owned tensor.
pub fn tensor_bytes(t: &Tensor) -> &[u8] {
    match &t.data {
        Data::F32(v) => bytemuck::cast_slice(v),
        Data::U16(v) => bytemuck::cast_slice(v),
        Data::I32(v) => bytemuck::cast_slice(v),
        Data::Bool(v) => v,
    }
}

/// A view of an owned tensor under an argument name (for the core's checks).
pub fn tensor_ref<'a>(name: &'static str, t: &'a Tensor) -> Result<TensorRef<'a>> {
    Ok(TensorRef::new(name, t.dtype, t.shape.clone(), tensor_bytes(t))?)
}

// ---------------------------------------------------------------------------------------
// The host paths of the device ops (download, the core, upload) share these.

/// Downloads an optional device tensor.
pub fn download_opt(dev: &Device, what: &str, t: Option<&DeviceTensor>) -> Result<Option<Tensor>> {
    t.map(|t| t.download(dev, what)).transpose()
}

/// A view of an optional owned tensor under an argument name.
pub fn opt_ref<'a>(name: &'static str, t: &'a Option<Tensor>) -> Result<Option<TensorRef<'a>>> {
    t.as_ref().map(|t| tensor_ref(name, t)).transpose()
}

/// Uploads an optional owned tensor.
pub fn upload_owned_opt(dev: &Device, what: &str, t: Option<&Tensor>) -> Result<Option<DeviceTensor>> {
    t.map(|t| DeviceTensor::upload_owned(dev, what, t)).transpose()
}

/// The host path of a device op: its tensors downloaded under their argument names (`required`,
/// then `optional`, an absent one staying absent) and handed to `f`, the core op, as views.
pub fn on_host<'d, const R: usize, const O: usize, T>(
    dev: &Device,
    required: [(&'static str, &'d DeviceTensor); R],
    optional: [(&'static str, Option<&'d DeviceTensor>); O],
    f: impl FnOnce([TensorRef; R], [Option<TensorRef>; O]) -> moe_core::Result<T>,
) -> Result<T> {
    let req = required.iter().map(|&(name, t)| Ok((name, t.download(dev, name)?))).collect::<Result<Vec<_>>>()?;
    let opt = optional.iter().map(|&(name, t)| Ok((name, download_opt(dev, name, t)?))).collect::<Result<Vec<_>>>()?;
    let req_refs = req.iter().map(|(name, t)| tensor_ref(name, t)).collect::<Result<Vec<_>>>()?;
    let opt_refs = opt.iter().map(|(name, t)| opt_ref(name, t)).collect::<Result<Vec<_>>>()?;
    let bug = || Error::Cuda("on_host: a tensor went missing (a bug in moe-dispatch)".into());
    Ok(f(req_refs.try_into().map_err(|_| bug())?, opt_refs.try_into().map_err(|_| bug())?)?)
}

/// [`DeviceTensor::meta`] of an optional argument.
pub fn opt_meta<'a>(t: Option<&'a DeviceTensor>, name: &'static str) -> Option<Meta<'a>> {
    t.map(|t| t.meta(name))
}
