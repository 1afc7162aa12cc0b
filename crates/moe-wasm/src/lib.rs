//! WebAssembly binding of moe-core. Each exported function copies its wire tensors into
//! wasm memory, calls exactly one core function, and returns plain JS objects
//! (`{ dtype, shape, data }` with a matching TypedArray); one file per op family,
//! mirroring the core's modules. Core errors are thrown as real `TypeError` / `RangeError`.

mod activations;
mod checkpoint;
mod dispatch;
mod experts;
mod layout;
mod routing;
mod wire;

use wasm_bindgen::prelude::*;

/// Worker threads of this backend: always 1 (wasm runs on the calling thread).
#[wasm_bindgen(js_name = numThreads)]
pub fn num_threads() -> u32 {
    moe_core::num_threads() as u32
}
