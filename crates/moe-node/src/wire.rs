//! Conversions at the N-API boundary: wire tensors in, typed arrays out, core errors and
//! panics to JS errors whose `code` names the class they should become.

use std::panic::{catch_unwind, AssertUnwindSafe};

use moe_core::{Data, Tensor, TensorRef};
use napi::bindgen_prelude::{Either4, Float32Array, Int32Array, Uint16Array, Uint8Array};
use napi_derive::napi;
/// A tensor as the facade sends it: the bytes of its TypedArray, with dtype and shape.
#[napi(object)]
pub struct WireTensor {
    pub dtype: String,
    pub shape: Vec<f64>,
    pub data: Uint8Array,
}

/// A tensor as the facade receives it: a TypedArray that matches the dtype
/// (bfloat16 and float16 as Uint16Array bits, bool as Uint8Array).
#[napi(object)]
pub struct WireTensorOut {
    pub dtype: String,
    pub shape: Vec<f64>,
    pub data: Either4<Float32Array, Uint16Array, Int32Array, Uint8Array>,
}

pub fn to_wire(t: Tensor) -> WireTensorOut {
    let data = match t.data {
        Data::F32(v) => Either4::A(Float32Array::new(v)),
        Data::U16(v) => Either4::B(Uint16Array::new(v)),
        Data::I32(v) => Either4::C(Int32Array::new(v)),
        Data::Bool(v) => Either4::D(Uint8Array::new(v)),
    };
    WireTensorOut { dtype: t.dtype.name().to_string(), shape: t.shape.iter().map(|&d| d as f64).collect(), data }
}

pub fn view<'a>(name: &'static str, w: &'a WireTensor) -> moe_core::Result<TensorRef<'a>> {
    TensorRef::from_parts(name, &w.dtype, &w.shape, &w.data)
}

pub fn opt_view<'a>(name: &'static str, w: &'a Option<WireTensor>) -> moe_core::Result<Option<TensorRef<'a>>> {
    w.as_ref().map(|w| view(name, w)).transpose()
}

/// Runs a core call; a core error or a panic becomes a JS error whose `code` names its class.
pub fn guard<T>(f: impl FnOnce() -> moe_core::Result<T>) -> napi::Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(napi::Error::new(e.kind().js_name().to_string(), e.to_string())),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(napi::Error::new("Error".to_string(), format!("internal error (a bug in moe-dispatch): {msg}")))
        }
    }
}

