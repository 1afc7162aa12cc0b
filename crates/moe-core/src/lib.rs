//! moe-core: the semantics of Mixture-of-Experts token routing and dispatch.
//!
//! Every operation of moe-dispatch lives here exactly once. The N-API, WebAssembly and
//! CUDA crates only translate their runtime's values into [`TensorRef`]s, call a function
//! of this crate, and translate the [`Tensor`]s or the [`Error`] back.
//!
//! The contract of each op is written down in `docs/semantics.md`; the reference
//! implementations are Megatron-Core's `moe_utils` and NeMo Automodel's `components/moe`.

pub mod activations;
pub mod alloc;
pub mod aux_loss;
pub mod capacity;
pub mod checkpoint;
pub mod chunks;
mod detmath;
pub mod error;
pub mod experts;
pub mod grouped;
mod par;
pub mod permute;
pub mod routing;
pub mod routing_map;
pub mod sharding;
pub mod tensor;

pub use error::{Error, ErrorKind, Result};
pub use tensor::{DType, Data, Meta, Tensor, TensorMut, TensorRef};

/// Worker threads the row loops use (1 without the `parallel` feature).
pub fn num_threads() -> usize {
    #[cfg(feature = "parallel")]
    {
        rayon::current_num_threads()
    }
    #[cfg(not(feature = "parallel"))]
    {
        1
    }
}
