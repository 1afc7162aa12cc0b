//! Checkpoints (safetensors) and the Hugging Face <-> stacked expert layouts. wasm has no
//! files: checkpoints come and go as bytes (the facade reads and writes files).

use js_sys::{Array, Uint8Array};
use moe_core::activations::ActivationKind;
use moe_core::checkpoint::{for_key, named, ByteSource, LoadedExperts, SliceSource};
use moe_core::error::{opt_size_arg, size_arg};
use moe_core::{Error, TensorRef};
use wasm_bindgen::prelude::*;

use crate::wire::{object, opt_view, tensor_to_js, to_js_error, Wire};

fn wires(tensors: &JsValue) -> Result<Vec<Wire>, JsValue> {
    if !Array::is_array(tensors) {
        return Err(js_sys::TypeError::new("tensors: expected an array of wire tensors").into());
    }
    Array::from(tensors).iter().map(|t| Wire::read("tensors", &t)).collect()
}

fn views<'a>(names: &[String], wires: &'a [Wire]) -> moe_core::Result<Vec<(String, TensorRef<'a>)>> {
    let refs = wires
        .iter()
        .enumerate()
        .map(|(i, w)| w.view().map_err(|e| for_key(e, "tensors", names.get(i).map_or("tensors", String::as_str))))
        .collect::<moe_core::Result<Vec<_>>>()?;
    named(names, refs)
}

/// The checkpoint's bytes; a path is refused (no files in wasm).
fn source(path: Option<String>, bytes: &JsValue) -> Result<Vec<u8>, JsValue> {
    if path.is_some() {
        return Err(to_js_error(Error::type_error("source", "the checkpoint's bytes (the wasm backend cannot open files; the facade reads them)", "a path")));
    }
    bytes
        .dyn_ref::<Uint8Array>()
        .map(Uint8Array::to_vec)
        .ok_or_else(|| to_js_error(Error::type_error("source", "a file path or the checkpoint's bytes (exactly one)", "neither")))
}

fn strings(items: impl IntoIterator<Item = String>) -> JsValue {
    items.into_iter().map(|s| JsValue::from_str(&s)).collect::<Array>().into()
}

fn named_to_js(items: Vec<(String, moe_core::Tensor)>, metadata: Vec<(String, String)>) -> JsValue {
    let tensors: Array = items.iter().map(|(_, t)| tensor_to_js(t.clone())).collect();
    let (keys, values): (Vec<String>, Vec<String>) = metadata.into_iter().unzip();
    object(vec![
        ("names", strings(items.into_iter().map(|(n, _)| n))),
        ("tensors", tensors.into()),
        ("metadataKeys", strings(keys)),
        ("metadataValues", strings(values)),
    ])
}

#[wasm_bindgen(js_name = safetensorsSave)]
pub fn safetensors_save(names: Vec<String>, tensors: JsValue, metadata_keys: Option<Vec<String>>, metadata_values: Option<Vec<String>>) -> Result<Vec<u8>, JsValue> {
    let wires = wires(&tensors)?;
    let meta: Vec<(String, String)> = metadata_keys.unwrap_or_default().into_iter().zip(metadata_values.unwrap_or_default()).collect();
    let run = || moe_core::checkpoint::save(&views(&names, &wires)?, &meta);
    run().map_err(to_js_error)
}

#[wasm_bindgen(js_name = safetensorsLoad)]
pub fn safetensors_load(path: Option<String>, bytes: JsValue, names: Option<Vec<String>>) -> Result<JsValue, JsValue> {
    let bytes = source(path, &bytes)?;
    let run = || {
        let mut src = SliceSource::new(&bytes);
        let header = moe_core::checkpoint::read_header(&mut src)?;
        let loaded = moe_core::checkpoint::load(&mut src, names.as_deref())?;
        Ok::<_, moe_core::Error>(named_to_js(loaded, header.metadata.into_iter().collect()))
    };
    run().map_err(to_js_error)
}

fn loaded_to_js(l: LoadedExperts) -> JsValue {
    let opt = |t: Option<moe_core::Tensor>| t.map_or(JsValue::UNDEFINED, tensor_to_js);
    object(vec![
        ("gateAndUpProjs", tensor_to_js(l.gate_and_up)),
        ("downProjs", tensor_to_js(l.down)),
        ("gateUpProjBias", opt(l.gate_up_bias)),
        ("downProjBias", opt(l.down_bias)),
        ("start", JsValue::from_f64(l.range.start as f64)),
        ("end", JsValue::from_f64(l.range.end as f64)),
        ("format", JsValue::from_str(l.format)),
        ("bytesRead", JsValue::from_f64(l.bytes_read as f64)),
    ])
}

#[wasm_bindgen(js_name = loadExperts)]
#[allow(clippy::too_many_arguments)]
pub fn load_experts(path: Option<String>, bytes: JsValue, prefix: String, num_experts: f64, ep_size: f64, ep_rank: f64, kind: Option<String>) -> Result<JsValue, JsValue> {
    let bytes = source(path, &bytes)?;
    let run = || {
        let kind = ActivationKind::parse(kind.as_deref())?;
        let (e, w, r) = (size_arg("numExperts", num_experts)?, size_arg("epSize", ep_size)?, size_arg("epRank", ep_rank)?);
        let mut src = SliceSource::new(&bytes);
        let src: &mut dyn ByteSource = &mut src;
        moe_core::checkpoint::load_experts(src, &prefix, e, w, r, kind)
    };
    run().map(loaded_to_js).map_err(to_js_error)
}

#[wasm_bindgen(js_name = stackExperts)]
pub fn stack_experts(names: Vec<String>, tensors: JsValue, prefix: String, num_experts: f64, kind: Option<String>) -> Result<JsValue, JsValue> {
    let wires = wires(&tensors)?;
    let run = || {
        let kind = ActivationKind::parse(kind.as_deref())?;
        let num_experts = size_arg("numExperts", num_experts)?;
        moe_core::checkpoint::stack_experts(&views(&names, &wires)?, &prefix, num_experts, kind)
    };
    run().map(loaded_to_js).map_err(to_js_error)
}

#[wasm_bindgen(js_name = unstackExperts)]
#[allow(clippy::too_many_arguments)]
pub fn unstack_experts(
    prefix: String,
    gate_and_up_projs: JsValue,
    down_projs: JsValue,
    gate_up_proj_bias: JsValue,
    down_proj_bias: JsValue,
    kind: Option<String>,
    first_expert: Option<f64>,
) -> Result<JsValue, JsValue> {
    let w1 = Wire::read("gateAndUpProjs", &gate_and_up_projs)?;
    let w2 = Wire::read("downProjs", &down_projs)?;
    let b1 = Wire::read_opt("gateUpProjBias", &gate_up_proj_bias)?;
    let b2 = Wire::read_opt("downProjBias", &down_proj_bias)?;
    let run = || {
        let kind = ActivationKind::parse(kind.as_deref())?;
        let first = opt_size_arg("firstExpert", first_expert)?.unwrap_or(0);
        moe_core::checkpoint::unstack_experts(&prefix, &w1.view()?, &w2.view()?, opt_view(&b1)?.as_ref(), opt_view(&b2)?.as_ref(), kind, first)
    };
    run().map(|items| named_to_js(items, Vec::new())).map_err(to_js_error)
}
