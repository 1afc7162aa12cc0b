//! Checkpoints (safetensors: one file, or a sharded checkpoint's index and shards) and the
//! expert key schemes. wasm has no files: a checkpoint is one file's bytes, or an index's
//! json bytes with the shard files' names and bytes. The bytes stay in JavaScript memory:
//! only the headers and the wanted tensors are copied in (so a multi-GB shard never has to
//! fit in the wasm memory).

use js_sys::{Array, Function, Reflect, Uint8Array};
use moe_core::activations::ActivationKind;
use moe_core::checkpoint::{for_key, named, out_of_range, ByteSource, Checkpoint, ExpertFormat, Loaded, LoadedExperts, Opener};
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

/// A Uint8Array in JavaScript memory, read range by range (lengths as f64: arrays over 4 GiB too).
struct JsSource {
    array: Uint8Array,
    subarray: Function,
    len: u64,
    read: u64,
}

impl JsSource {
    fn new(array: Uint8Array) -> Result<JsSource, Error> {
        let len = Reflect::get(&array, &JsValue::from_str("length")).ok().and_then(|v| v.as_f64()).unwrap_or(0.0);
        let subarray = Reflect::get(&array, &JsValue::from_str("subarray"))
            .ok()
            .and_then(|f| f.dyn_into::<Function>().ok())
            .ok_or_else(|| Error::type_error("source", "a Uint8Array", "an object without subarray"))?;
        Ok(JsSource { array, subarray, len: len as u64, read: 0 })
    }
}

impl ByteSource for JsSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> moe_core::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.len);
        let Some(end) = end else {
            return Err(out_of_range(self.len, offset, buf.len()));
        };
        let sub = self
            .subarray
            .call2(&self.array, &JsValue::from_f64(offset as f64), &JsValue::from_f64(end as f64))
            .ok()
            .and_then(|s| s.dyn_into::<Uint8Array>().ok())
            .filter(|s| s.length() as usize == buf.len())
            .ok_or_else(|| Error::range("bytes", format!("cannot read bytes {offset}..{end} of the checkpoint (was its buffer detached?)")))?;
        sub.copy_to(buf);
        self.read += buf.len() as u64;
        Ok(())
    }

    fn bytes_read(&self) -> u64 {
        self.read
    }
}

fn uint8(value: &JsValue, arg: &str) -> Result<Uint8Array, Error> {
    value.dyn_ref::<Uint8Array>().cloned().ok_or_else(|| Error::type_error(arg, "a Uint8Array", if value.is_undefined() { "undefined" } else { "another value" }))
}

/// Runs `f` on the checkpoint the source arguments describe; a path is refused (no files in wasm).
fn with_checkpoint<T>(path: Option<String>, bytes: &JsValue, index: &JsValue, shard_names: Option<Vec<String>>, shard_bytes: &JsValue, f: impl FnOnce(&mut Checkpoint) -> moe_core::Result<T>) -> moe_core::Result<T> {
    if path.is_some() {
        return Err(Error::type_error(
            "source",
            "the checkpoint's bytes (a Uint8Array) or { index, shards } with the shard files' bytes: the wasm backend cannot open files (in Node, read them with fs.readFileSync, or use the native backend, which opens paths and reads only the bytes it needs)",
            "a path",
        ));
    }
    match (bytes.is_undefined() || bytes.is_null(), index.is_undefined() || index.is_null()) {
        (false, true) => f(&mut Checkpoint::single("", Box::new(JsSource::new(uint8(bytes, "source")?)?))?),
        (true, false) => {
            let idx = uint8(index, "source.index")?.to_vec();
            let names = shard_names.unwrap_or_default();
            let arrays: Vec<JsValue> = if Array::is_array(shard_bytes) { Array::from(shard_bytes).iter().collect() } else { Vec::new() };
            if names.len() != arrays.len() {
                return Err(Error::range("source.shards", format!("{} shard names for {} shards", names.len(), arrays.len())));
            }
            let mut shards = Vec::with_capacity(names.len());
            for (n, a) in names.into_iter().zip(arrays) {
                let arr = uint8(&a, &format!("source.shards['{n}']"))?;
                shards.push((n, arr));
            }
            let opener: Opener = Box::new(move |file: &str| match shards.iter().find(|(n, _)| n == file) {
                Some((_, a)) => Ok(Some(Box::new(JsSource::new(a.clone())?) as Box<dyn ByteSource>)),
                None => Ok(None),
            });
            f(&mut Checkpoint::sharded(&idx, opener)?)
        }
        _ => Err(Error::type_error("source", "one file's bytes or { index, shards } (exactly one)", "both or neither")),
    }
}

fn strings(items: impl IntoIterator<Item = String>) -> JsValue {
    items.into_iter().map(|s| JsValue::from_str(&s)).collect::<Array>().into()
}

fn shape_js(shape: &[usize]) -> JsValue {
    shape.iter().map(|&d| JsValue::from_f64(d as f64)).collect::<Array>().into()
}

/// A loaded tensor; int64 as its little-endian bytes (the facade makes a BigInt64Array).
fn loaded_to_js_tensor(t: Loaded) -> JsValue {
    match t {
        Loaded::Tensor(t) => tensor_to_js(t),
        Loaded::Int64 { shape, bytes } => object(vec![("dtype", JsValue::from_str("int64")), ("shape", shape_js(&shape)), ("data", Uint8Array::from(&bytes[..]).into())]),
    }
}

fn named_to_js(items: Vec<(String, JsValue)>, metadata: Vec<(String, String)>, bytes_read: u64) -> JsValue {
    let (names, tensors): (Vec<String>, Vec<JsValue>) = items.into_iter().unzip();
    let (keys, values): (Vec<String>, Vec<String>) = metadata.into_iter().unzip();
    object(vec![
        ("names", strings(names)),
        ("tensors", tensors.into_iter().collect::<Array>().into()),
        ("metadataKeys", strings(keys)),
        ("metadataValues", strings(values)),
        ("bytesRead", JsValue::from_f64(bytes_read as f64)),
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
pub fn safetensors_load(path: Option<String>, bytes: JsValue, index: JsValue, shard_names: Option<Vec<String>>, shard_bytes: JsValue, names: Option<Vec<String>>) -> Result<JsValue, JsValue> {
    with_checkpoint(path, &bytes, &index, shard_names, &shard_bytes, |ck| {
        let loaded = ck.load(names.as_deref())?;
        let items = loaded.into_iter().map(|(n, t)| (n, loaded_to_js_tensor(t))).collect();
        Ok(named_to_js(items, ck.metadata(), ck.bytes_read()))
    })
    .map_err(to_js_error)
}

#[wasm_bindgen(js_name = checkpointInfo)]
pub fn checkpoint_info(path: Option<String>, bytes: JsValue, index: JsValue, shard_names: Option<Vec<String>>, shard_bytes: JsValue) -> Result<JsValue, JsValue> {
    with_checkpoint(path, &bytes, &index, shard_names, &shard_bytes, |ck| {
        let info = ck.info()?;
        let (keys, values): (Vec<String>, Vec<String>) = ck.metadata().into_iter().unzip();
        let shapes: Array = info.iter().map(|t| shape_js(&t.shape)).collect();
        Ok(object(vec![
            ("names", strings(info.iter().map(|t| t.name.clone()))),
            ("dtypes", strings(info.iter().map(|t| t.dtype.clone()))),
            ("shapes", shapes.into()),
            ("files", strings(info.iter().map(|t| t.file.clone()))),
            ("metadataKeys", strings(keys)),
            ("metadataValues", strings(values)),
            ("bytesRead", JsValue::from_f64(ck.bytes_read() as f64)),
        ]))
    })
    .map_err(to_js_error)
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
        ("format", JsValue::from_str(l.format.name())),
        ("bytesRead", JsValue::from_f64(l.bytes_read as f64)),
    ])
}

#[wasm_bindgen(js_name = loadExperts)]
#[allow(clippy::too_many_arguments)]
pub fn load_experts(
    path: Option<String>,
    bytes: JsValue,
    index: JsValue,
    shard_names: Option<Vec<String>>,
    shard_bytes: JsValue,
    prefix: String,
    num_experts: f64,
    ep_size: f64,
    ep_rank: f64,
    kind: Option<String>,
    format: Option<String>,
) -> Result<JsValue, JsValue> {
    let run = || {
        let kind = ActivationKind::parse(kind.as_deref())?;
        let format = ExpertFormat::parse(format.as_deref())?;
        let (e, w, r) = (size_arg("numExperts", num_experts)?, size_arg("epSize", ep_size)?, size_arg("epRank", ep_rank)?);
        with_checkpoint(path, &bytes, &index, shard_names, &shard_bytes, |ck| moe_core::checkpoint::load_experts(ck, &prefix, e, w, r, kind, format))
    };
    run().map(loaded_to_js).map_err(to_js_error)
}

#[wasm_bindgen(js_name = stackExperts)]
pub fn stack_experts(names: Vec<String>, tensors: JsValue, prefix: String, num_experts: f64, kind: Option<String>, format: Option<String>) -> Result<JsValue, JsValue> {
    let wires = wires(&tensors)?;
    let run = || {
        let kind = ActivationKind::parse(kind.as_deref())?;
        let format = ExpertFormat::parse(format.as_deref())?;
        let num_experts = size_arg("numExperts", num_experts)?;
        moe_core::checkpoint::stack_experts(&views(&names, &wires)?, &prefix, num_experts, kind, format)
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
    format: Option<String>,
) -> Result<JsValue, JsValue> {
    let w1 = Wire::read("gateAndUpProjs", &gate_and_up_projs)?;
    let w2 = Wire::read("downProjs", &down_projs)?;
    let b1 = Wire::read_opt("gateUpProjBias", &gate_up_proj_bias)?;
    let b2 = Wire::read_opt("downProjBias", &down_proj_bias)?;
    let run = || {
        let kind = ActivationKind::parse(kind.as_deref())?;
        let format = ExpertFormat::parse(format.as_deref())?.unwrap_or(ExpertFormat::Hf);
        let first = opt_size_arg("firstExpert", first_expert)?.unwrap_or(0);
        moe_core::checkpoint::unstack_experts(&prefix, &w1.view()?, &w2.view()?, opt_view(&b1)?.as_ref(), opt_view(&b2)?.as_ref(), kind, first, format)
    };
    run().map(|items| named_to_js(items.into_iter().map(|(n, t)| (n, tensor_to_js(t))).collect(), Vec::new(), 0)).map_err(to_js_error)
}
