//! Expert activations and the aux router losses on device tensors (crates/moe-cuda/src/activations.rs):
//! the argument objects of `activation`, `activationBackward`, `switchLoadBalancingLoss`,
//! `switchLoadBalancingLossFromLogits` and `zLoss` (the op table's fields and groups, read in its
//! order), with device tensors.

use moe_bind::ops::{ActArgs, SwitchArgs};
use moe_bind::Num;
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
    /// `switchLoadBalancingLoss` on device tensors: the loss is read back, the gradient stays on the GPU.
    cudaSwitchLoadBalancingLossDevice(options: SwitchArgs, probs: Device, tokensPerExpert: Device, tokenMask: Option<Device>) -> DeviceOut |dev| {
        let (loss, grad) = gpu::switch_load_balancing_loss_device(dev, &probs, &tokensPerExpert, tokenMask.as_deref(), options)?;
        Ok(device_out!(loss: loss, gradProbs: grad))
    }
    /// `switchLoadBalancingLossFromLogits` on device tensors.
    cudaSwitchLoadBalancingLossFromLogitsDevice(options: SwitchArgs, logits: Device, tokensPerExpert: Device, tokenMask: Option<Device>) -> DeviceOut |dev| {
        let (loss, grad) = gpu::switch_load_balancing_loss_from_logits_device(dev, &logits, &tokensPerExpert, tokenMask.as_deref(), options)?;
        Ok(device_out!(loss: loss, gradLogits: grad))
    }
    /// `zLoss` on device tensors.
    cudaZLossDevice(logits: Device, coeff: Option<Num>, tokenMask: Option<Device>) -> DeviceOut |dev| {
        let (loss, grad) = gpu::z_loss_device(dev, &logits, tokenMask.as_deref(), coeff.unwrap_or(DEFAULT_COEFF))?;
        Ok(device_out!(loss: loss, gradLogits: grad))
    }
}
