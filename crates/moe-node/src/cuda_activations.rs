//! Expert activations and the aux router losses on device tensors (crates/moe-cuda/src/activations.rs):
//! the argument objects of `activation`, `activationBackward`, `switchLoadBalancingLoss`,
//! `switchLoadBalancingLossFromLogits` and `zLoss` (the op table's fields and groups, read in its
//! order), with device tensors.

use moe_bind::ops::{ActArgs, SwitchArgs};
use moe_bind::{Flag, Num};
use moe_core::aux_loss::DEFAULT_COEFF;
use moe_cuda::activations as gpu;

use crate::cuda::{CudaTensor, Device, DeviceOut};

cuda_fns! {
    /// `activation` on device tensors.
    cudaActivationDevice(options: ActArgs, x: Device, probs: Option<Device>) -> CudaTensor |dev| {
        Ok(CudaTensor::wrap(gpu::activation_device(dev, &x, probs.as_deref(), &options)?))
    }
    /// `activationBackward` on device tensors.
    cudaActivationBackwardDevice(options: ActArgs, grad: Device, x: Device, probs: Option<Device>) -> DeviceOut |dev| {
        let (g, p) = gpu::activation_backward_device(dev, &grad, &x, probs.as_deref(), &options)?;
        Ok(device_out!(gradInput: g, gradProbs: p))
    }
    /// `switchLoadBalancingLoss` on device tensors: the loss is read back (with `lazyLoss`, left
    /// on the GPU as `lossWords` for cudaReadLoss), the gradient stays on the GPU.
    cudaSwitchLoadBalancingLossDevice(options: SwitchArgs, probs: Device, tokensPerExpert: Device, tokenMask: Option<Device>, lazyLoss: Flag) -> DeviceOut |dev| {
        let q = gpu::switch_load_balancing_loss_device_lazy(dev, &probs, &tokensPerExpert, tokenMask.as_deref(), options)?;
        loss_out(dev, q, lazyLoss, "gradProbs", || gpu::switch_load_balancing_loss_device(dev, &probs, &tokensPerExpert, tokenMask.as_deref(), options))
    }
    /// `switchLoadBalancingLossFromLogits` on device tensors.
    cudaSwitchLoadBalancingLossFromLogitsDevice(options: SwitchArgs, logits: Device, tokensPerExpert: Device, tokenMask: Option<Device>, lazyLoss: Flag) -> DeviceOut |dev| {
        let q = gpu::switch_load_balancing_loss_from_logits_device_lazy(dev, &logits, &tokensPerExpert, tokenMask.as_deref(), options)?;
        loss_out(dev, q, lazyLoss, "gradLogits", || gpu::switch_load_balancing_loss_from_logits_device(dev, &logits, &tokensPerExpert, tokenMask.as_deref(), options))
    }
    /// `zLoss` on device tensors.
    cudaZLossDevice(logits: Device, coeff: Option<Num>, tokenMask: Option<Device>, lazyLoss: Flag) -> DeviceOut |dev| {
        let coeff = coeff.unwrap_or(DEFAULT_COEFF);
        let q = gpu::z_loss_device_lazy(dev, &logits, tokenMask.as_deref(), coeff)?;
        loss_out(dev, q, lazyLoss, "gradLogits", || gpu::z_loss_device(dev, &logits, tokenMask.as_deref(), coeff))
    }
    /// A lazy loss's value (a synchronisation): a number, or null where a kernel flagged an
    /// input value (the eager op then gives the error).
    cudaReadLoss(words: Device) -> Option<f64> |dev| {
        gpu::read_device_loss(dev, &words)
    }
}

/// A loss op's result: with `lazy`, the queued loss as `lossWords` (or `loss` where the host path
/// computed it); else the loss read back, and where a kernel flagged a value, `eager` (the op's
/// host path: the core's error).
fn loss_out(
    dev: &moe_cuda::Device,
    (loss, grad): (gpu::DeviceLoss, moe_cuda::tensor::DeviceTensor),
    lazy: bool,
    grad_key: &'static str,
    eager: impl FnOnce() -> moe_cuda::Result<(f64, moe_cuda::tensor::DeviceTensor)>,
) -> moe_cuda::Result<DeviceOut> {
    let (loss, grad) = match loss {
        gpu::DeviceLoss::Pending(words) if lazy => return Ok(DeviceOut::default().with("lossWords", words).with(grad_key, grad)),
        gpu::DeviceLoss::Value(v) => (v, grad),
        gpu::DeviceLoss::Pending(words) => match gpu::read_device_loss(dev, &words)? {
            Some(v) => (v, grad),
            None => eager()?,
        },
    };
    Ok(DeviceOut::default().with("loss", loss).with(grad_key, grad))
}
