//! The N-API side of the boundary: reading an op's argument object (`Args`, moe-bind's `Obj`),
//! writing its result (`Js`), core errors and panics as JS errors whose `code` names their class;
//! and the napi-derive objects the CUDA functions take and return.

use std::panic::{catch_unwind, AssertUnwindSafe};

use moe_bind::{Obj, OutBuf, Value};
use moe_core::checkpoint::{ByteSource, Checkpoint, SliceSource};
use moe_core::{Data, Error, Tensor, TensorRef};
use napi::bindgen_prelude::{Either4, Env, Float32Array, FromNapiValue, Int32Array, Null, Object, ToNapiValue, Uint16Array, Uint8Array};
use napi::sys;
use napi_derive::napi;

/// An op's argument object (absent when the op was called without one).
pub struct Args<'e>(pub Option<Object<'e>>);

impl Args<'_> {
    pub(crate) fn get<V: FromNapiValue>(&self, key: &str, expected: &str) -> moe_core::Result<Option<V>> {
        let Some(o) = &self.0 else { return Ok(None) };
        o.get::<Option<V>>(key).map(Option::flatten).map_err(|_| Error::type_error(key, expected, "another kind of value"))
    }
}

/// A caller-owned output: the caller's own bytes, which the core writes in place (no copy).
pub struct NodeOut(Uint8Array);

impl OutBuf for NodeOut {
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the array's memory belongs to the JS caller, which is blocked in this
        // synchronous call; the core checks that it overlaps no input before writing.
        unsafe { self.0.as_mut() }
    }
}

impl<'e> Obj for Args<'e> {
    type Bytes = Uint8Array;
    type Blob = Uint8Array;
    type Out = NodeOut;
    fn keys(&self) -> moe_core::Result<Vec<String>> {
        self.0.as_ref().map_or(Ok(Vec::new()), |o| Object::keys(o).map_err(|e| Error::Internal(e.reason.clone())))
    }
    fn object(&self, key: &str) -> moe_core::Result<Option<Self>> {
        Ok(self.get::<Object<'e>>(key, "an object")?.map(|o| Args(Some(o))))
    }
    fn number(&self, key: &str) -> moe_core::Result<Option<f64>> {
        self.get(key, "a number")
    }
    fn boolean(&self, key: &str) -> moe_core::Result<Option<bool>> {
        self.get(key, "a boolean")
    }
    fn string(&self, key: &str) -> moe_core::Result<Option<String>> {
        self.get(key, "a string")
    }
    fn numbers(&self, key: &str) -> moe_core::Result<Option<Vec<f64>>> {
        self.get(key, "an array of numbers")
    }
    fn strings(&self, key: &str) -> moe_core::Result<Option<Vec<String>>> {
        self.get(key, "an array of strings")
    }
    fn bytes(&self, key: &str) -> moe_core::Result<Option<Uint8Array>> {
        self.get(key, "a Uint8Array")
    }
    fn blob(&self, key: &str) -> moe_core::Result<Option<Uint8Array>> {
        self.get(key, "a Uint8Array")
    }
    fn out(&self, key: &str) -> moe_core::Result<Option<NodeOut>> {
        Ok(self.get(key, "a Uint8Array")?.map(NodeOut))
    }
    fn source(blob: &Uint8Array) -> moe_core::Result<Box<dyn ByteSource + '_>> {
        Ok(Box::new(SliceSource::new(blob)))
    }
    fn open_path<'a>(path: &str) -> moe_core::Result<Checkpoint<'a>> {
        Checkpoint::open_path(path)
    }
}

/// A result as a JS value.
pub struct Js(pub Value);

impl ToNapiValue for Js {
    unsafe fn to_napi_value(env: sys::napi_env, val: Js) -> napi::Result<sys::napi_value> {
        match val.0 {
            Value::Undefined => <()>::to_napi_value(env, ()),
            Value::Null => Null::to_napi_value(env, Null),
            Value::Bool(b) => bool::to_napi_value(env, b),
            Value::Num(n) => f64::to_napi_value(env, n),
            Value::Str(s) => String::to_napi_value(env, s),
            Value::Bytes(b) => Uint8Array::to_napi_value(env, Uint8Array::new(b)),
            Value::List(l) => Vec::<Js>::to_napi_value(env, l.into_iter().map(Js).collect()),
            Value::Obj(fields) => {
                let mut o = Object::new(&Env::from(env))?;
                for (k, v) in fields.into_iter().filter(|(_, v)| !matches!(v, Value::Undefined)) {
                    o.set(k, Js(v))?;
                }
                Object::to_napi_value(env, o)
            }
            Value::Tensor(t) => WireTensorOut::to_napi_value(env, to_wire(t)),
        }
    }
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

// The CUDA functions' objects (cuda*.rs).

/// A tensor as the facade sends it: the bytes of its TypedArray, with dtype and shape.
#[napi(object)]
pub struct WireTensor {
    pub dtype: String,
    pub shape: Vec<f64>,
    pub data: Uint8Array,
}

/// A tensor as the facade receives it: a TypedArray that matches the dtype.
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
