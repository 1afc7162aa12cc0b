//! WebAssembly binding of moe-core. Each exported function copies its wire tensors into
//! wasm memory, calls exactly one core function, and returns plain JS objects
//! (`{ dtype, shape, data }` with a matching TypedArray). Core errors are thrown as real
//! `TypeError` / `RangeError` objects.

use moe_core::error::{opt_size_arg, size_arg};
use moe_core::permute::{PermuteOptions, UnpermuteOptions};
use moe_core::{Data, ErrorKind, Tensor, TensorRef};
use js_sys::{Array, Float32Array, Int32Array, Object, Reflect, Uint16Array, Uint8Array};
use wasm_bindgen::prelude::*;

/// A wire tensor copied into wasm memory.
struct Wire {
    name: &'static str,
    dtype: String,
    shape: Vec<f64>,
    bytes: Vec<u8>,
}

impl Wire {
    fn read(name: &'static str, value: &JsValue) -> Result<Wire, JsValue> {
        let field = |key: &str| Reflect::get(value, &JsValue::from_str(key)).unwrap_or(JsValue::UNDEFINED);
        let bad = |what: &str| js_sys::TypeError::new(&format!("{name}: expected a wire tensor {{ dtype, shape, data: Uint8Array }}, {what}"));
        if !value.is_object() {
            return Err(bad("got a non-object").into());
        }
        let dtype = field("dtype").as_string().ok_or_else(|| bad("dtype is not a string"))?;
        let shape_value = field("shape");
        if !Array::is_array(&shape_value) {
            return Err(bad("shape is not an array").into());
        }
        let shape = Array::from(&shape_value).iter().map(|d| d.as_f64().unwrap_or(f64::NAN)).collect();
        let data = field("data").dyn_into::<Uint8Array>().map_err(|_| bad("data is not a Uint8Array"))?;
        Ok(Wire { name, dtype, shape, bytes: data.to_vec() })
    }

    fn read_opt(name: &'static str, value: &JsValue) -> Result<Option<Wire>, JsValue> {
        if value.is_undefined() || value.is_null() {
            Ok(None)
        } else {
            Wire::read(name, value).map(Some)
        }
    }

    fn view(&self) -> moe_core::Result<TensorRef<'_>> {
        TensorRef::from_parts(self.name, &self.dtype, &self.shape, &self.bytes)
    }
}

fn opt_view(w: &Option<Wire>) -> moe_core::Result<Option<TensorRef<'_>>> {
    w.as_ref().map(Wire::view).transpose()
}

fn to_js_error(e: moe_core::Error) -> JsValue {
    let msg = e.to_string();
    match e.kind() {
        ErrorKind::TypeError => js_sys::TypeError::new(&msg).into(),
        ErrorKind::RangeError => js_sys::RangeError::new(&msg).into(),
        ErrorKind::Error => js_sys::Error::new(&msg).into(),
    }
}

fn set(obj: &Object, key: &str, value: &JsValue) {
    // Setting a property on a fresh plain object cannot fail.
    let _ = Reflect::set(obj, &JsValue::from_str(key), value);
}

fn tensor_to_js(t: Tensor) -> JsValue {
    let obj = Object::new();
    set(&obj, "dtype", &JsValue::from_str(t.dtype.name()));
    let shape: Array = t.shape.iter().map(|&d| JsValue::from_f64(d as f64)).collect();
    set(&obj, "shape", &shape);
    let data: JsValue = match &t.data {
        Data::F32(v) => Float32Array::from(&v[..]).into(),
        Data::U16(v) => Uint16Array::from(&v[..]).into(),
        Data::I32(v) => Int32Array::from(&v[..]).into(),
        Data::Bool(v) => Uint8Array::from(&v[..]).into(),
    };
    set(&obj, "data", &data);
    obj.into()
}

fn object(fields: Vec<(&str, JsValue)>) -> JsValue {
    let obj = Object::new();
    for (k, v) in fields {
        set(&obj, k, &v);
    }
    obj.into()
}

#[wasm_bindgen(js_name = indicesToMultihot)]
pub fn indices_to_multihot(indices: JsValue, probs: JsValue, num_experts: f64) -> Result<JsValue, JsValue> {
    let (indices, probs) = (Wire::read("indices", &indices)?, Wire::read("probs", &probs)?);
    let run = || {
        let num_experts = size_arg("numExperts", num_experts)?;
        moe_core::routing_map::indices_to_multihot(&indices.view()?, &probs.view()?, num_experts)
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![("routingMap", tensor_to_js(out.routing_map)), ("probs", tensor_to_js(out.probs))]))
}

#[wasm_bindgen(js_name = multihotToIndices)]
pub fn multihot_to_indices(routing_map: JsValue, probs: JsValue, topk: Option<f64>) -> Result<JsValue, JsValue> {
    let (routing_map, probs) = (Wire::read("routingMap", &routing_map)?, Wire::read_opt("probs", &probs)?);
    let run = || {
        let topk = opt_size_arg("topk", topk)?;
        moe_core::routing_map::multihot_to_indices(&routing_map.view()?, opt_view(&probs)?.as_ref(), topk)
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![("indices", tensor_to_js(out.indices)), ("probs", tensor_to_js(out.probs))]))
}

#[wasm_bindgen]
pub fn permute(
    tokens: JsValue,
    routing_map: JsValue,
    probs: JsValue,
    num_out_tokens: Option<f64>,
    drop_and_pad: Option<bool>,
) -> Result<JsValue, JsValue> {
    let tokens = Wire::read("tokens", &tokens)?;
    let routing_map = Wire::read("routingMap", &routing_map)?;
    let probs = Wire::read_opt("probs", &probs)?;
    let run = || {
        let options = PermuteOptions {
            num_out_tokens: opt_size_arg("numOutTokens", num_out_tokens)?,
            drop_and_pad: drop_and_pad.unwrap_or(false),
        };
        moe_core::permute::permute(&tokens.view()?, &routing_map.view()?, opt_view(&probs)?.as_ref(), options)
    };
    let out = run().map_err(to_js_error)?;
    Ok(object(vec![
        ("permutedTokens", tensor_to_js(out.permuted_tokens)),
        ("permutedProbs", out.permuted_probs.map_or(JsValue::UNDEFINED, tensor_to_js)),
        ("sortedIndices", tensor_to_js(out.sorted_indices)),
        ("tokensPerExpert", tensor_to_js(out.tokens_per_expert)),
    ]))
}

#[wasm_bindgen]
pub fn unpermute(
    permuted_tokens: JsValue,
    sorted_indices: JsValue,
    restore_shape: Vec<f64>,
    probs: JsValue,
    routing_map: JsValue,
    drop_and_pad: Option<bool>,
) -> Result<JsValue, JsValue> {
    let permuted_tokens = Wire::read("permutedTokens", &permuted_tokens)?;
    let sorted_indices = Wire::read("sortedIndices", &sorted_indices)?;
    let probs = Wire::read_opt("probs", &probs)?;
    let routing_map = Wire::read_opt("routingMap", &routing_map)?;
    let run = || {
        moe_core::permute::unpermute(
            &permuted_tokens.view()?,
            &sorted_indices.view()?,
            moe_core::permute::restore_shape_arg(&restore_shape)?,
            opt_view(&probs)?.as_ref(),
            opt_view(&routing_map)?.as_ref(),
            UnpermuteOptions { drop_and_pad: drop_and_pad.unwrap_or(false) },
        )
    };
    run().map(tensor_to_js).map_err(to_js_error)
}

/// Worker threads of this backend: always 1 (wasm runs on the calling thread).
#[wasm_bindgen(js_name = numThreads)]
pub fn num_threads() -> u32 {
    moe_core::num_threads() as u32
}
