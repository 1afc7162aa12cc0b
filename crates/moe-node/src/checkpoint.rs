//! Checkpoints (safetensors) and the Hugging Face <-> stacked expert layouts.

use moe_core::activations::ActivationKind;
use moe_core::checkpoint::{for_key, named, ByteSource, FileSource, LoadedExperts, SliceSource};
use moe_core::error::{opt_size_arg, size_arg};
use moe_core::{Error, TensorRef};
use napi::bindgen_prelude::Uint8Array;
use napi_derive::napi;

use crate::wire::{guard, opt_view, to_wire, view, WireTensor, WireTensorOut};

fn views<'a>(names: &[String], tensors: &'a [WireTensor]) -> moe_core::Result<Vec<(String, TensorRef<'a>)>> {
    let refs = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| view("tensors", t).map_err(|e| for_key(e, "tensors", names.get(i).map_or("tensors", String::as_str))))
        .collect::<moe_core::Result<Vec<_>>>()?;
    named(names, refs)
}

/// Runs `f` on the file at `path` or on `bytes` (exactly one of them).
fn with_source<T>(path: Option<String>, bytes: Option<Uint8Array>, f: impl FnOnce(&mut dyn ByteSource) -> moe_core::Result<T>) -> moe_core::Result<T> {
    match (path, bytes) {
        (Some(p), None) => f(&mut FileSource::open(&p)?),
        (None, Some(b)) => f(&mut SliceSource::new(&b)),
        _ => Err(Error::type_error("source", "a file path or the checkpoint's bytes (exactly one)", "both or neither")),
    }
}

#[napi]
pub fn safetensors_save(names: Vec<String>, tensors: Vec<WireTensor>, metadata_keys: Option<Vec<String>>, metadata_values: Option<Vec<String>>) -> napi::Result<Uint8Array, String> {
    guard(|| {
        let meta: Vec<(String, String)> = metadata_keys.unwrap_or_default().into_iter().zip(metadata_values.unwrap_or_default()).collect();
        Ok(Uint8Array::new(moe_core::checkpoint::save(&views(&names, &tensors)?, &meta)?))
    })
}

#[napi(object)]
pub struct NamedTensorsOut {
    pub names: Vec<String>,
    pub tensors: Vec<WireTensorOut>,
    pub metadata_keys: Vec<String>,
    pub metadata_values: Vec<String>,
}

#[napi]
pub fn safetensors_load(path: Option<String>, bytes: Option<Uint8Array>, names: Option<Vec<String>>) -> napi::Result<NamedTensorsOut, String> {
    guard(|| {
        with_source(path, bytes, |src| {
            let header = moe_core::checkpoint::read_header(src)?;
            let loaded = moe_core::checkpoint::load(src, names.as_deref())?;
            let (names, tensors) = loaded.into_iter().map(|(n, t)| (n, to_wire(t))).unzip();
            let (metadata_keys, metadata_values) = header.metadata.into_iter().unzip();
            Ok(NamedTensorsOut { names, tensors, metadata_keys, metadata_values })
        })
    })
}

#[napi(object)]
pub struct LoadedExpertsOut {
    pub gate_and_up_projs: WireTensorOut,
    pub down_projs: WireTensorOut,
    pub gate_up_proj_bias: Option<WireTensorOut>,
    pub down_proj_bias: Option<WireTensorOut>,
    pub start: f64,
    pub end: f64,
    pub format: String,
    pub bytes_read: f64,
}

fn loaded_out(l: LoadedExperts) -> LoadedExpertsOut {
    LoadedExpertsOut {
        gate_and_up_projs: to_wire(l.gate_and_up),
        down_projs: to_wire(l.down),
        gate_up_proj_bias: l.gate_up_bias.map(to_wire),
        down_proj_bias: l.down_bias.map(to_wire),
        start: l.range.start as f64,
        end: l.range.end as f64,
        format: l.format.to_string(),
        bytes_read: l.bytes_read as f64,
    }
}

#[napi]
#[allow(clippy::too_many_arguments)]
pub fn load_experts(
    path: Option<String>,
    bytes: Option<Uint8Array>,
    prefix: String,
    num_experts: f64,
    ep_size: f64,
    ep_rank: f64,
    kind: Option<String>,
) -> napi::Result<LoadedExpertsOut, String> {
    guard(|| {
        let kind = ActivationKind::parse(kind.as_deref())?;
        let (e, w, r) = (size_arg("numExperts", num_experts)?, size_arg("epSize", ep_size)?, size_arg("epRank", ep_rank)?);
        with_source(path, bytes, |src| moe_core::checkpoint::load_experts(src, &prefix, e, w, r, kind)).map(loaded_out)
    })
}

#[napi]
pub fn stack_experts(names: Vec<String>, tensors: Vec<WireTensor>, prefix: String, num_experts: f64, kind: Option<String>) -> napi::Result<LoadedExpertsOut, String> {
    guard(|| {
        let kind = ActivationKind::parse(kind.as_deref())?;
        let num_experts = size_arg("numExperts", num_experts)?;
        moe_core::checkpoint::stack_experts(&views(&names, &tensors)?, &prefix, num_experts, kind).map(loaded_out)
    })
}

#[napi(object)]
pub struct ExpertTensorsOut {
    pub names: Vec<String>,
    pub tensors: Vec<WireTensorOut>,
}

#[napi]
#[allow(clippy::too_many_arguments)]
pub fn unstack_experts(
    prefix: String,
    gate_and_up_projs: WireTensor,
    down_projs: WireTensor,
    gate_up_proj_bias: Option<WireTensor>,
    down_proj_bias: Option<WireTensor>,
    kind: Option<String>,
    first_expert: Option<f64>,
) -> napi::Result<ExpertTensorsOut, String> {
    guard(|| {
        let kind = ActivationKind::parse(kind.as_deref())?;
        let first = opt_size_arg("firstExpert", first_expert)?.unwrap_or(0);
        let out = moe_core::checkpoint::unstack_experts(
            &prefix,
            &view("gateAndUpProjs", &gate_and_up_projs)?,
            &view("downProjs", &down_projs)?,
            opt_view("gateUpProjBias", &gate_up_proj_bias)?.as_ref(),
            opt_view("downProjBias", &down_proj_bias)?.as_ref(),
            kind,
            first,
        )?;
        let (names, tensors) = out.into_iter().map(|(n, t)| (n, to_wire(t))).unzip();
        Ok(ExpertTensorsOut { names, tensors })
    })
}
