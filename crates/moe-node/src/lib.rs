//! N-API binding of moe-core: the op table of `moe-bind` (every CPU op, its argument object and
//! result) exported as `#[napi]` functions, plus the CUDA backend's functions (cuda*.rs). This
//! crate only reads JS objects (wire.rs) and writes JS values; errors leave with `code` set to
//! the JavaScript class they should become ("TypeError", "RangeError" or "Error"), which the
//! TypeScript facade rethrows as such.

mod cuda;
mod cuda_activations;
mod cuda_experts;
mod cuda_layout;
mod cuda_train;
mod wire;

/// The N-API objects the CUDA functions return, where cuda.rs imports them from.
mod dispatch {
    pub use crate::wire::PermuteOut;
}
mod routing {
    pub use crate::wire::{RouteOut, TopKValuesOut};
}

use napi::bindgen_prelude::Object;
use napi_derive::napi;

use crate::wire::{guard, Args, Js};

macro_rules! export {
    ($( $(#[doc = $doc:literal])* $name:ident ( $($arg:ident : $kind:ty),* $(,)? ) -> $ret:ty $body:block )*) => {$(
        $(#[doc = $doc])*
        #[napi]
        #[allow(non_snake_case)]
        pub fn $name(args: Option<Object>) -> napi::Result<Js, String> {
            guard(|| moe_bind::ops::$name(&Args(args)).map(Js))
        }
    )*};
}

moe_bind::op_table!(export);
