//! Checkpoints (safetensors: one file, or a sharded checkpoint's index and shards) and the
//! expert key schemes. A source is exactly one of: a path (a `.safetensors` file, an index
//! `.json`, or a directory holding one), one file's bytes, or an index's json bytes with the
//! shard files' names and bytes (only the shards a call needs have to be there).

use std::collections::HashMap;

use moe_core::activations::ActivationKind;
use moe_core::checkpoint::{for_key, named, ByteSource, Checkpoint, ExpertFormat, Loaded, LoadedExperts, Opener, SliceSource};
use moe_core::error::{opt_size_arg, size_arg};
use moe_core::{Error, TensorRef};
use napi::bindgen_prelude::{Either4, Uint8Array};
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

/// Runs `f` on the checkpoint the source arguments describe (exactly one kind of source).
fn with_checkpoint<T>(
    path: Option<String>,
    bytes: Option<Uint8Array>,
    index: Option<Uint8Array>,
    shard_names: Option<Vec<String>>,
    shard_bytes: Option<Vec<Uint8Array>>,
    f: impl FnOnce(&mut Checkpoint) -> moe_core::Result<T>,
) -> moe_core::Result<T> {
    match (path, bytes, index) {
        (Some(p), None, None) => f(&mut Checkpoint::open_path(&p)?),
        (None, Some(b), None) => f(&mut Checkpoint::single("", Box::new(SliceSource::new(&b)))?),
        (None, None, Some(idx)) => {
            let names = shard_names.unwrap_or_default();
            let shards = shard_bytes.unwrap_or_default();
            if names.len() != shards.len() {
                return Err(Error::range("source.shards", format!("{} shard names for {} shards", names.len(), shards.len())));
            }
            let by_name: HashMap<&str, &[u8]> = names.iter().map(String::as_str).zip(shards.iter().map(|s| &s[..])).collect();
            let opener: Opener = Box::new(move |file: &str| Ok(by_name.get(file).map(|&b| Box::new(SliceSource::new(b)) as Box<dyn ByteSource + '_>)));
            let mut ck = Checkpoint::sharded(&idx, opener)?;
            f(&mut ck)
        }
        _ => Err(Error::type_error("source", "a path, one file's bytes, or { index, shards } (exactly one)", "several or none")),
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
    pub bytes_read: f64,
}

/// A loaded tensor on the wire; int64 as its little-endian bytes (the facade makes a BigInt64Array).
fn loaded_wire(t: Loaded) -> WireTensorOut {
    match t {
        Loaded::Tensor(t) => to_wire(t),
        Loaded::Int64 { shape, bytes } => WireTensorOut { dtype: "int64".to_string(), shape: shape.iter().map(|&d| d as f64).collect(), data: Either4::D(Uint8Array::new(bytes)) },
    }
}

#[napi]
pub fn safetensors_load(
    path: Option<String>,
    bytes: Option<Uint8Array>,
    index: Option<Uint8Array>,
    shard_names: Option<Vec<String>>,
    shard_bytes: Option<Vec<Uint8Array>>,
    names: Option<Vec<String>>,
) -> napi::Result<NamedTensorsOut, String> {
    guard(|| {
        with_checkpoint(path, bytes, index, shard_names, shard_bytes, |ck| {
            let loaded = ck.load(names.as_deref())?;
            let (names, tensors) = loaded.into_iter().map(|(n, t)| (n, loaded_wire(t))).unzip();
            let (metadata_keys, metadata_values) = ck.metadata().into_iter().unzip();
            Ok(NamedTensorsOut { names, tensors, metadata_keys, metadata_values, bytes_read: ck.bytes_read() as f64 })
        })
    })
}

#[napi(object)]
pub struct CheckpointInfoOut {
    pub names: Vec<String>,
    pub dtypes: Vec<String>,
    pub shapes: Vec<Vec<f64>>,
    pub files: Vec<String>,
    pub metadata_keys: Vec<String>,
    pub metadata_values: Vec<String>,
    pub bytes_read: f64,
}

#[napi]
pub fn checkpoint_info(
    path: Option<String>,
    bytes: Option<Uint8Array>,
    index: Option<Uint8Array>,
    shard_names: Option<Vec<String>>,
    shard_bytes: Option<Vec<Uint8Array>>,
) -> napi::Result<CheckpointInfoOut, String> {
    guard(|| {
        with_checkpoint(path, bytes, index, shard_names, shard_bytes, |ck| {
            let info = ck.info()?;
            let (metadata_keys, metadata_values) = ck.metadata().into_iter().unzip();
            let mut out = CheckpointInfoOut { names: Vec::new(), dtypes: Vec::new(), shapes: Vec::new(), files: Vec::new(), metadata_keys, metadata_values, bytes_read: ck.bytes_read() as f64 };
            for t in info {
                out.names.push(t.name);
                out.dtypes.push(t.dtype);
                out.shapes.push(t.shape.iter().map(|&d| d as f64).collect());
                out.files.push(t.file);
            }
            Ok(out)
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
        format: l.format.name().to_string(),
        bytes_read: l.bytes_read as f64,
    }
}

#[napi]
#[allow(clippy::too_many_arguments)]
pub fn load_experts(
    path: Option<String>,
    bytes: Option<Uint8Array>,
    index: Option<Uint8Array>,
    shard_names: Option<Vec<String>>,
    shard_bytes: Option<Vec<Uint8Array>>,
    prefix: String,
    num_experts: f64,
    ep_size: f64,
    ep_rank: f64,
    kind: Option<String>,
    format: Option<String>,
) -> napi::Result<LoadedExpertsOut, String> {
    guard(|| {
        let kind = ActivationKind::parse(kind.as_deref())?;
        let format = ExpertFormat::parse(format.as_deref())?;
        let (e, w, r) = (size_arg("numExperts", num_experts)?, size_arg("epSize", ep_size)?, size_arg("epRank", ep_rank)?);
        with_checkpoint(path, bytes, index, shard_names, shard_bytes, |ck| moe_core::checkpoint::load_experts(ck, &prefix, e, w, r, kind, format)).map(loaded_out)
    })
}

#[napi]
pub fn stack_experts(names: Vec<String>, tensors: Vec<WireTensor>, prefix: String, num_experts: f64, kind: Option<String>, format: Option<String>) -> napi::Result<LoadedExpertsOut, String> {
    guard(|| {
        let kind = ActivationKind::parse(kind.as_deref())?;
        let format = ExpertFormat::parse(format.as_deref())?;
        let num_experts = size_arg("numExperts", num_experts)?;
        moe_core::checkpoint::stack_experts(&views(&names, &tensors)?, &prefix, num_experts, kind, format).map(loaded_out)
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
    format: Option<String>,
) -> napi::Result<ExpertTensorsOut, String> {
    guard(|| {
        let kind = ActivationKind::parse(kind.as_deref())?;
        let format = ExpertFormat::parse(format.as_deref())?.unwrap_or(ExpertFormat::Hf);
        let first = opt_size_arg("firstExpert", first_expert)?.unwrap_or(0);
        let out = moe_core::checkpoint::unstack_experts(
            &prefix,
            &view("gateAndUpProjs", &gate_and_up_projs)?,
            &view("downProjs", &down_projs)?,
            opt_view("gateUpProjBias", &gate_up_proj_bias)?.as_ref(),
            opt_view("downProjBias", &down_proj_bias)?.as_ref(),
            kind,
            first,
            format,
        )?;
        let (names, tensors) = out.into_iter().map(|(n, t)| (n, to_wire(t))).unzip();
        Ok(ExpertTensorsOut { names, tensors })
    })
}
