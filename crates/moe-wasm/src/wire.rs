//! The wasm side of the boundary: reading an op's argument object (`Args`, moe-bind's `Obj`;
//! tensors copied into wasm memory, a checkpoint's bytes read range by range from JavaScript
//! memory, so a multi-GB shard never has to fit in the wasm memory), results as plain JS objects
//! with matching TypedArrays, core errors as real TypeError / RangeError.

use js_sys::{Array, Float32Array, Function, Int32Array, Object, Reflect, Uint16Array, Uint8Array};
use moe_bind::{Obj, OutBuf, Value};
use moe_core::checkpoint::{out_of_range, ByteSource, Checkpoint};
use moe_core::{Data, Error, ErrorKind};
use wasm_bindgen::prelude::*;

/// An op's argument object.
pub struct Args(pub JsValue);

impl Args {
    fn get<T>(&self, key: &str, expected: &str, f: impl FnOnce(&JsValue) -> Option<T>) -> moe_core::Result<Option<T>> {
        let v = Reflect::get(&self.0, &JsValue::from_str(key)).unwrap_or(JsValue::UNDEFINED);
        if v.is_undefined() || v.is_null() {
            return Ok(None);
        }
        f(&v).map(Some).ok_or_else(|| Error::type_error(key, expected, v.js_typeof().as_string().unwrap_or_default()))
    }
}

fn array<T>(v: &JsValue, f: impl Fn(JsValue) -> Option<T>) -> Option<Vec<T>> {
    Array::is_array(v).then(|| Array::from(v).iter().map(f).collect()).flatten()
}

/// A caller-owned output: the core writes into a buffer in wasm memory (8-byte aligned), copied
/// into the caller's array once the op succeeded (the data has to cross the boundary once).
pub struct WasmOut {
    js: Uint8Array,
    buf: Vec<u64>,
    len: usize,
}

impl OutBuf for WasmOut {
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `buf` holds at least `len` bytes (len.div_ceil(8) words), any bytes are valid u64s.
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr() as *mut u8, self.len) }
    }
    fn commit(&mut self) {
        // SAFETY: as in bytes_mut.
        let bytes = unsafe { std::slice::from_raw_parts(self.buf.as_ptr() as *const u8, self.len) };
        self.js.copy_from(bytes);
    }
}

impl Obj for Args {
    type Bytes = Vec<u8>;
    type Blob = Uint8Array;
    type Out = WasmOut;
    fn keys(&self) -> moe_core::Result<Vec<String>> {
        Ok(Object::keys(self.0.unchecked_ref::<Object>()).iter().filter_map(|k| k.as_string()).collect())
    }
    fn object(&self, key: &str) -> moe_core::Result<Option<Args>> {
        self.get(key, "an object", |v| v.is_object().then(|| Args(v.clone())))
    }
    fn number(&self, key: &str) -> moe_core::Result<Option<f64>> {
        self.get(key, "a number", JsValue::as_f64)
    }
    fn boolean(&self, key: &str) -> moe_core::Result<Option<bool>> {
        self.get(key, "a boolean", JsValue::as_bool)
    }
    fn string(&self, key: &str) -> moe_core::Result<Option<String>> {
        self.get(key, "a string", JsValue::as_string)
    }
    fn numbers(&self, key: &str) -> moe_core::Result<Option<Vec<f64>>> {
        // NaN for a non-number element: the core reports it as a bad size.
        self.get(key, "an array of numbers", |v| array(v, |d| Some(d.as_f64().unwrap_or(f64::NAN))))
    }
    fn strings(&self, key: &str) -> moe_core::Result<Option<Vec<String>>> {
        self.get(key, "an array of strings", |v| array(v, |s| s.as_string()))
    }
    fn bytes(&self, key: &str) -> moe_core::Result<Option<Vec<u8>>> {
        self.get(key, "a Uint8Array", |v| v.dyn_ref::<Uint8Array>().map(Uint8Array::to_vec))
    }
    fn blob(&self, key: &str) -> moe_core::Result<Option<Uint8Array>> {
        self.get(key, "a Uint8Array", |v| v.dyn_ref::<Uint8Array>().cloned())
    }
    fn out(&self, key: &str) -> moe_core::Result<Option<WasmOut>> {
        let Some(js) = self.blob(key)? else { return Ok(None) };
        let len = js.length() as usize;
        let buf = moe_core::alloc::try_zeroed_words(len.div_ceil(8), key)?;
        Ok(Some(WasmOut { js, buf, len }))
    }
    fn source(blob: &Uint8Array) -> moe_core::Result<Box<dyn ByteSource + '_>> {
        Ok(Box::new(JsSource::new(blob.clone())?))
    }
    fn open_path<'a>(_: &str) -> moe_core::Result<Checkpoint<'a>> {
        Err(Error::type_error(
            "source",
            "the checkpoint's bytes (a Uint8Array) or { index, shards } with the shard files' bytes: the wasm backend cannot open files (in Node, read them with fs.readFileSync, or use the native backend, which opens paths and reads only the bytes it needs)",
            "a path",
        ))
    }
}

/// A Uint8Array in JavaScript memory, read range by range (lengths as f64: arrays over 4 GiB too).
struct JsSource {
    array: Uint8Array,
    subarray: Function,
    len: u64,
    read: u64,
}

impl JsSource {
    fn new(array: Uint8Array) -> moe_core::Result<JsSource> {
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
        let Some(end) = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.len) else {
            return Err(out_of_range(self.len, offset, buf.len()));
        };
        let sub = self
            .subarray
            .call2(&self.array, &JsValue::from_f64(offset as f64), &JsValue::from_f64(end as f64))
            .ok()
            .and_then(|s| s.dyn_into::<Uint8Array>().ok())
            .filter(|s| s.length() as usize == buf.len())
            .ok_or_else(|| {
                Error::range("bytes", format!("cannot read bytes {offset}..{end} of the checkpoint (was its buffer detached?)"))
            })?;
        sub.copy_to(buf);
        self.read += buf.len() as u64;
        Ok(())
    }

    fn bytes_read(&self) -> u64 {
        self.read
    }
}

pub fn to_js_error(e: Error) -> JsValue {
    let msg = e.to_string();
    match e.kind() {
        ErrorKind::TypeError => js_sys::TypeError::new(&msg).into(),
        ErrorKind::RangeError => js_sys::RangeError::new(&msg).into(),
        ErrorKind::Error => js_sys::Error::new(&msg).into(),
    }
}

/// A plain object of the fields that are not undefined (setting a property on a fresh plain object cannot fail).
fn object<K: AsRef<str>>(fields: impl IntoIterator<Item = (K, JsValue)>) -> JsValue {
    let obj = Object::new();
    for (k, v) in fields.into_iter().filter(|(_, v)| !v.is_undefined()) {
        let _ = Reflect::set(&obj, &JsValue::from_str(k.as_ref()), &v);
    }
    obj.into()
}

/// A result as a JS value.
pub fn to_js(v: Value) -> JsValue {
    match v {
        Value::Undefined => JsValue::UNDEFINED,
        Value::Null => JsValue::NULL,
        Value::Bool(b) => JsValue::from_bool(b),
        Value::Num(n) => JsValue::from_f64(n),
        Value::Str(s) => JsValue::from_str(&s),
        Value::Bytes(b) => Uint8Array::from(&b[..]).into(),
        Value::List(l) => l.into_iter().map(to_js).collect::<Array>().into(),
        Value::Obj(fields) => object(fields.into_iter().map(|(k, v)| (k, to_js(v)))),
        Value::Tensor(t) => {
            let shape: Array = t.shape.iter().map(|&d| JsValue::from_f64(d as f64)).collect();
            let data: JsValue = match &t.data {
                Data::F32(v) => Float32Array::from(&v[..]).into(),
                Data::U16(v) => Uint16Array::from(&v[..]).into(),
                Data::I32(v) => Int32Array::from(&v[..]).into(),
                Data::Bool(v) => Uint8Array::from(&v[..]).into(),
            };
            object([("dtype", JsValue::from_str(t.dtype.name())), ("shape", shape.into()), ("data", data)])
        }
    }
}
