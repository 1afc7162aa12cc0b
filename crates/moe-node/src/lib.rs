//! N-API binding of moe-core. Each exported function converts its wire tensors into
//! `TensorRef`s, calls exactly one core function, and converts the result back.
//! Errors leave with `code` set to the JavaScript class they should become
//! ("TypeError", "RangeError" or "Error"); the TypeScript facade rethrows them as such.

use std::panic::{catch_unwind, AssertUnwindSafe};

use moe_core::error::{opt_size_arg, size_arg};
use moe_core::permute::{PermuteOptions, UnpermuteOptions};
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

fn to_wire(t: Tensor) -> WireTensorOut {
    let data = match t.data {
        Data::F32(v) => Either4::A(Float32Array::new(v)),
        Data::U16(v) => Either4::B(Uint16Array::new(v)),
        Data::I32(v) => Either4::C(Int32Array::new(v)),
        Data::Bool(v) => Either4::D(Uint8Array::new(v)),
    };
    WireTensorOut { dtype: t.dtype.name().to_string(), shape: t.shape.iter().map(|&d| d as f64).collect(), data }
}

fn view<'a>(name: &'static str, w: &'a WireTensor) -> moe_core::Result<TensorRef<'a>> {
    TensorRef::from_parts(name, &w.dtype, &w.shape, &w.data)
}

fn opt_view<'a>(name: &'static str, w: &'a Option<WireTensor>) -> moe_core::Result<Option<TensorRef<'a>>> {
    w.as_ref().map(|w| view(name, w)).transpose()
}

/// Runs a core call; a core error or a panic becomes a JS error whose `code` names its class.
fn guard<T>(f: impl FnOnce() -> moe_core::Result<T>) -> napi::Result<T, String> {
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

#[napi(object)]
pub struct MultihotOut {
    pub routing_map: WireTensorOut,
    pub probs: WireTensorOut,
}

#[napi]
pub fn indices_to_multihot(indices: WireTensor, probs: WireTensor, num_experts: f64) -> napi::Result<MultihotOut, String> {
    guard(|| {
        let num_experts = size_arg("numExperts", num_experts)?;
        let out = moe_core::routing_map::indices_to_multihot(&view("indices", &indices)?, &view("probs", &probs)?, num_experts)?;
        Ok(MultihotOut { routing_map: to_wire(out.routing_map), probs: to_wire(out.probs) })
    })
}

#[napi(object)]
pub struct TopKOut {
    pub indices: WireTensorOut,
    pub probs: WireTensorOut,
}

#[napi]
pub fn multihot_to_indices(routing_map: WireTensor, probs: Option<WireTensor>, topk: Option<f64>) -> napi::Result<TopKOut, String> {
    guard(|| {
        let topk = opt_size_arg("topk", topk)?;
        let out = moe_core::routing_map::multihot_to_indices(&view("routingMap", &routing_map)?, opt_view("probs", &probs)?.as_ref(), topk)?;
        Ok(TopKOut { indices: to_wire(out.indices), probs: to_wire(out.probs) })
    })
}

#[napi(object)]
pub struct PermuteOut {
    pub permuted_tokens: WireTensorOut,
    pub permuted_probs: Option<WireTensorOut>,
    pub sorted_indices: WireTensorOut,
    pub tokens_per_expert: WireTensorOut,
}

#[napi]
pub fn permute(
    tokens: WireTensor,
    routing_map: WireTensor,
    probs: Option<WireTensor>,
    num_out_tokens: Option<f64>,
    drop_and_pad: Option<bool>,
) -> napi::Result<PermuteOut, String> {
    guard(|| {
        let options = PermuteOptions {
            num_out_tokens: opt_size_arg("numOutTokens", num_out_tokens)?,
            drop_and_pad: drop_and_pad.unwrap_or(false),
        };
        let out = moe_core::permute::permute(
            &view("tokens", &tokens)?,
            &view("routingMap", &routing_map)?,
            opt_view("probs", &probs)?.as_ref(),
            options,
        )?;
        Ok(PermuteOut {
            permuted_tokens: to_wire(out.permuted_tokens),
            permuted_probs: out.permuted_probs.map(to_wire),
            sorted_indices: to_wire(out.sorted_indices),
            tokens_per_expert: to_wire(out.tokens_per_expert),
        })
    })
}

#[napi]
pub fn unpermute(
    permuted_tokens: WireTensor,
    sorted_indices: WireTensor,
    restore_shape: Vec<f64>,
    probs: Option<WireTensor>,
    routing_map: Option<WireTensor>,
    drop_and_pad: Option<bool>,
) -> napi::Result<WireTensorOut, String> {
    guard(|| {
        let restore = moe_core::permute::restore_shape_arg(&restore_shape)?;
        let out = moe_core::permute::unpermute(
            &view("permutedTokens", &permuted_tokens)?,
            &view("sortedIndices", &sorted_indices)?,
            restore,
            opt_view("probs", &probs)?.as_ref(),
            opt_view("routingMap", &routing_map)?.as_ref(),
            UnpermuteOptions { drop_and_pad: drop_and_pad.unwrap_or(false) },
        )?;
        Ok(to_wire(out))
    })
}

/// Worker threads the native backend uses for large inputs.
#[napi]
pub fn num_threads() -> u32 {
    moe_core::num_threads() as u32
}
