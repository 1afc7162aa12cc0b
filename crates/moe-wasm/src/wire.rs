//! Conversions at the wasm boundary: wire tensors copied into wasm memory, outputs as
//! plain JS objects with matching TypedArrays, core errors as real TypeError / RangeError.

use js_sys::{Array, Float32Array, Int32Array, Object, Reflect, Uint16Array, Uint8Array};
use moe_core::{Data, ErrorKind, Tensor, TensorRef};
use wasm_bindgen::prelude::*;

/// A wire tensor copied into wasm memory.
pub struct Wire {
    name: &'static str,
    dtype: String,
    shape: Vec<f64>,
    bytes: Vec<u8>,
}

impl Wire {
    pub fn read(name: &'static str, value: &JsValue) -> Result<Wire, JsValue> {
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

    pub fn read_opt(name: &'static str, value: &JsValue) -> Result<Option<Wire>, JsValue> {
        if value.is_undefined() || value.is_null() {
            Ok(None)
        } else {
            Wire::read(name, value).map(Some)
        }
    }

    pub fn view(&self) -> moe_core::Result<TensorRef<'_>> {
        TensorRef::from_parts(self.name, &self.dtype, &self.shape, &self.bytes)
    }
}

pub fn opt_view(w: &Option<Wire>) -> moe_core::Result<Option<TensorRef<'_>>> {
    w.as_ref().map(Wire::view).transpose()
}

pub fn to_js_error(e: moe_core::Error) -> JsValue {
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

pub fn tensor_to_js(t: Tensor) -> JsValue {
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

pub fn object(fields: Vec<(&str, JsValue)>) -> JsValue {
    let obj = Object::new();
    for (k, v) in fields {
        set(&obj, k, &v);
    }
    obj.into()
}

