//! The grouped experts and matmul on device tensors (crates/moe-cuda/src/experts.rs): the
//! argument objects of `expertsForward` / `expertsBackward` / `matmul` (the op table's fields and
//! groups, read in its order: the activation's options and the experts' tensors are the same
//! groups), with device tensors, and what the GPU adds (`saveForBackward`, `saved`,
//! `gatherIndices`: the experts' rows gathered from the tokens in their own order).

use moe_bind::ops::{ActArgs, ExpertsArgs};
use moe_bind::{ArgTs, Flag, Kind, Obj};
use moe_core::experts::ExpertsGrads;
use moe_cuda::experts::{self, DeviceExpertsGrads, ExpertsSaved, GradOutput, SavedArg, SavedRef, SavedSlots, TokensGrad};
use moe_cuda::tensor::DeviceTensor;

use crate::cuda::{CudaTensor, Device, DeviceOut};
use crate::wire::Args;

/// expertsBackward's `saved` on the GPU: `{ upProjection, activation, counts, free }` as expertsForward
/// with saveForBackward returned them (both tensors, or no `saved`; `counts`, the forward's
/// per-expert rows, optional: without it the backward reads `tokensPerExpert` again; `free`:
/// the call takes the two tensors out of their handles and frees each as it goes, see [`SavedHeld`]).
pub struct Saved;

impl ArgTs for Saved {
    const OPTIONAL: bool = true;
    fn ts() -> String {
        "{ upProjection: NativeCudaTensor; activation: NativeCudaTensor; counts?: number[]; free?: boolean }".into()
    }
}

type DeviceHeld<'e> = <Device as Kind<Args<'e>>>::Held;

/// `saved` as read: its handles and counts, and with `free` the two tensors taken out of their
/// handles into the call's slots ([`SavedSlots`]; the handles read as disposed). What the call
/// leaves in the slots (all of it where a check fails first) goes back to the handles when this
/// is dropped, after the call.
pub struct SavedHeld<'e> {
    handles: [Option<DeviceHeld<'e>>; 2],
    counts: Option<Vec<i32>>,
    slots: Option<SavedSlots>,
}

impl Drop for SavedHeld<'_> {
    fn drop(&mut self) {
        let Some(slots) = self.slots.take() else { return };
        let (up, act) = slots.into_parts();
        for (handle, t) in self.handles.iter_mut().zip([up, act]) {
            if let (Some(h), Some(t)) = (handle.as_mut(), t) {
                h.restore(t);
            }
        }
    }
}

/// The forward's counts as given: whole numbers in int32's range, or a TypeError naming them.
fn saved_counts(v: Option<Vec<f64>>) -> moe_core::Result<Option<Vec<i32>>> {
    let Some(v) = v else { return Ok(None) };
    v.iter()
        .map(|&c| {
            (c.fract() == 0.0 && (0.0..=i32::MAX as f64).contains(&c)).then_some(c as i32).ok_or_else(|| {
                moe_core::Error::type_error("saved.counts", "non-negative whole numbers (expertsForward's saved.counts)", c.to_string())
            })
        })
        .collect::<moe_core::Result<Vec<i32>>>()
        .map(Some)
}

const SAVED_NAMES: [&str; 2] = ["saved.upProjection", "saved.activation"];

/// The TypeError of a `saved` that lacks tensor `i` of SAVED_NAMES (the other given).
fn saved_missing(i: usize) -> moe_core::Error {
    moe_core::Error::type_error(SAVED_NAMES[i], format!("a device tensor (saved with {})", SAVED_NAMES[1 - i]), "undefined")
}

/// With `free`: both tensors taken out of their handles (a disposed one is a TypeError naming it,
/// and the other is put back).
fn take_saved(handles: &mut [Option<DeviceHeld<'_>>; 2], counts: &Option<Vec<i32>>) -> moe_core::Result<SavedSlots> {
    let [Some(up), Some(act)] = handles else {
        return Err(saved_missing(if handles[0].is_none() { 0 } else { 1 }));
    };
    let u = up.take(SAVED_NAMES[0])?;
    let a = match act.take(SAVED_NAMES[1]) {
        Ok(a) => a,
        Err(e) => {
            up.restore(u);
            return Err(e);
        }
    };
    Ok(SavedSlots::new(ExpertsSaved { up_projection: u, activation: a, counts: counts.clone() }))
}

impl<'e> Kind<Args<'e>> for Saved {
    type Held = Option<SavedHeld<'e>>;
    type Core<'h>
        = Option<SavedArg<'h>>
    where
        Args<'e>: 'h;
    fn read(o: &Args<'e>, key: &str) -> moe_core::Result<Option<Self::Held>> {
        let Some(s) = o.object(key)? else { return Ok(Some(None)) };
        let mut handles = [Device::read(&s, "upProjection")?, Device::read(&s, "activation")?];
        let counts = saved_counts(s.numbers("counts")?)?;
        let free = s.get::<bool>("free", "a boolean")?.unwrap_or(false);
        let slots = if free { Some(take_saved(&mut handles, &counts)?) } else { None };
        Ok(Some(Some(SavedHeld { handles, counts, slots })))
    }
    fn core<'h>(held: &'h Self::Held, _: &'static str) -> moe_core::Result<Option<SavedArg<'h>>>
    where
        Args<'e>: 'h,
    {
        let Some(held) = held else { return Ok(None) };
        if let Some(slots) = &held.slots {
            return Ok(Some(SavedArg::Given(slots)));
        }
        let [up, act] = &held.handles;
        let up = up.as_ref().ok_or_else(|| saved_missing(0))?;
        let act = act.as_ref().ok_or_else(|| saved_missing(1))?;
        Ok(Some(SavedArg::Lent(SavedRef {
            up_projection: Device::core(up, SAVED_NAMES[0])?.tensor,
            activation: Device::core(act, SAVED_NAMES[1])?.tensor,
            counts: held.counts.as_deref(),
        })))
    }
}

/// With `freeTokens`, once the backward is done: permutedTokens taken out of its handle (which
/// then reads as disposed) and turned into the tokens' gradient ([`experts::grads_over_tokens`]:
/// their buffer where the grouped GEMM wrote dx over them, else dropped).
fn given_tokens_grad(o: &Args<'_>, g: ExpertsGrads<DeviceTensor, TokensGrad>) -> moe_cuda::Result<DeviceExpertsGrads> {
    let mut handle =
        Device::read(o, "permutedTokens")?.ok_or_else(|| moe_core::Error::type_error("permutedTokens", "a device tensor", "undefined"))?;
    Ok(experts::grads_over_tokens(g, handle.take("permutedTokens")?))
}

cuda_fns! {
    /// `expertsForward` on device tensors (cuBLAS GEMMs per expert); with saveForBackward also
    /// the up-projection and the weighted activation (`upProjection`, `activation`).
    cudaExpertsForwardDevice(options: ActArgs, inputs: ExpertsArgs<Device>, saveForBackward: Flag, gatherIndices: Option<Device>) -> DeviceOut |dev| {
        let inputs = inputs.into();
        let (out, saved) = match gatherIndices {
            Some(rows) => experts::experts_forward_device_gathering(dev, &inputs, &rows, &options, saveForBackward)?,
            None => experts::experts_forward_device_saving(dev, &inputs, &options, saveForBackward)?,
        };
        let (up, act, counts) = match saved {
            Some(s) => (Some(s.up_projection), Some(s.activation), s.counts),
            None => (None, None, None),
        };
        Ok(device_out!(output: out, upProjection: up, activation: act, counts: counts))
    }
    /// `expertsBackward` on device tensors (`saved`: what the forward kept; `gradGatherIndices`:
    /// gradOutput is the tokens' gradient in their own order, its rows gathered by the call;
    /// `freeTokens`: permutedTokens given to the call, see [`given_tokens_grad`]).
    cudaExpertsBackwardDevice(options: ActArgs, gradOutput: Device, inputs: ExpertsArgs<Device>, saved: Saved, gatherIndices: Option<Device>, gradGatherIndices: Option<Device>, freeTokens: Flag) -> DeviceOut |dev, o| {
        let inputs = inputs.into();
        let grad = match &gradGatherIndices {
            Some(rows) => GradOutput::Gathered { tokens: &gradOutput, rows },
            None => GradOutput::Rows(&gradOutput),
        };
        let g: DeviceExpertsGrads = match (gatherIndices, freeTokens) {
            (Some(_), true) => return Err(moe_core::Error::type_error("freeTokens", "false with gatherIndices (the tokens are the caller's in their own order)", "true").into()),
            (Some(rows), false) => experts::experts_backward_device_gathering(dev, grad, &inputs, &rows, &options, saved)?,
            (None, true) => given_tokens_grad(o, experts::experts_backward_device_over_tokens(dev, grad, &inputs, &options, saved)?)?,
            (None, false) => experts::experts_backward_device_saved(dev, grad, &inputs, &options, saved)?,
        };
        Ok(device_out!(
            gradTokens: g.grad_tokens, gradGateAndUpProjs: g.grad_gate_and_up, gradDownProjs: g.grad_down,
            gradGateUpProjBias: g.grad_gate_up_bias, gradDownProjBias: g.grad_down_bias, gradProbs: g.grad_probs,
        ))
    }
    /// `matmul` on device tensors (one cuBLAS GEMM).
    cudaMatmulDevice(a: Device, b: Device, transA: Flag, transB: Flag) -> CudaTensor |dev| {
        Ok(CudaTensor::wrap(experts::matmul_device(dev, &a, &b, transA, transB)?))
    }
}
