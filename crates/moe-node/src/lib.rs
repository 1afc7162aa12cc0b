//! N-API binding of moe-core: the op table of `moe-bind` (every CPU op, its argument object and
//! result) exported as `#[napi]` functions, plus the CUDA backend's functions (cuda*.rs). This
//! crate only reads JS objects (wire.rs) and writes JS values; errors leave with `code` set to
//! the JavaScript class they should become ("TypeError", "RangeError" or "Error"), which the
//! TypeScript facade rethrows as such.

/// The CUDA backend's op functions (cuda*.rs): each takes one argument object, read field by
/// field by the op table's kinds and groups (`moe_bind::read_args!`: the same reading, the same
/// errors in the same order as the CPU op's; before the GPU is opened), `Device` for a device
/// tensor; the body then runs on the process's GPU, with the object itself as `$o` when it names one.
macro_rules! cuda_fns {
    ($( $(#[doc = $doc:literal])* $name:ident ( $($arg:ident : $kind:ty),* $(,)? ) -> $ret:ty |$dev:ident $(, $o:ident)?| $body:block )*) => {$(
        $(#[doc = $doc])*
        #[napi_derive::napi]
        #[allow(non_snake_case)]
        pub fn $name(args: Option<napi::bindgen_prelude::Object>) -> napi::Result<$ret, String> {
            let o = crate::wire::Args(args);
            crate::cuda::guarded(|| {
                $( let $o = &o; )?
                moe_bind::read_args!(&o, crate::wire::Args<'_>; $($arg: $kind),*);
                let $dev = moe_cuda::Device::global()?;
                $body
            })
        }
    )*};
}

/// A device op's result object (`cuda::DeviceOut`): `jsKey: value` for each of its fields (a
/// device tensor, an optional one, or a number), keyed as the op table's result.
macro_rules! device_out {
    ($($key:ident: $v:expr),* $(,)?) => {
        crate::cuda::DeviceOut::default()$(.with(stringify!($key), $v))*
    };
}

mod cuda;
mod cuda_activations;
mod cuda_experts;
mod cuda_layout;
mod cuda_train;
mod nccl;
mod wire;

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
