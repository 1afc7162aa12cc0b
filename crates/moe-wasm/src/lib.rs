//! WebAssembly binding of moe-core: the op table of `moe-bind` (every CPU op, its argument
//! object and result) exported as `#[wasm_bindgen]` functions. This crate only reads JS objects
//! (wire.rs: tensors are copied into wasm memory, checkpoint bytes stay in JavaScript memory)
//! and writes plain JS objects; core errors are thrown as real `TypeError` / `RangeError`.

mod wire;

use wasm_bindgen::prelude::*;

use crate::wire::{to_js, to_js_error, Args};

macro_rules! export {
    ($( $(#[doc = $doc:literal])* $name:ident ( $($arg:ident : $kind:ty),* $(,)? ) -> $ret:ty $body:block )*) => {$(
        $(#[doc = $doc])*
        #[wasm_bindgen]
        #[allow(non_snake_case)]
        pub fn $name(args: JsValue) -> Result<JsValue, JsValue> {
            moe_bind::ops::$name(&Args(args)).map(to_js).map_err(to_js_error)
        }
    )*};
}

moe_bind::op_table!(export);
